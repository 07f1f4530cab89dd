"""How long a closed connection takes to show in /metrics, on an idle daemon.

Single connections at random moments; the load generator reports the CLOCK_MONOTONIC time
of the client's close(), and /metrics is polled every 10 ms until both reporters' closed
counters have risen. Expected: anywhere up to metrics.interval.
"""

from __future__ import annotations

import random
import time

from tests.bench.loadgen import Loadgen
from tests.bench.scenarios import Scenario
from tests.daemon_proc import DaemonProcess, value

POLL_S = 0.01


def closes(daemon: DaemonProcess, scenario: Scenario) -> tuple[int, int]:
    """closed_total for (reporter=source, reporter=destination) between the two workloads."""
    samples = daemon.samples()
    ends = {
        "source_workload": scenario.source_workload,
        "destination_workload": scenario.destination_workload,
    }
    metric = "kmesh_tcp_workload_connections_closed_total"
    return (
        int(value(samples, metric, reporter="source", **ends)),
        int(value(samples, metric, reporter="destination", **ends)),
    )


def wait_visible(
    daemon: DaemonProcess,
    scenario: Scenario,
    before: tuple[int, int],
    closed_at: float,
    bound: float,
) -> float:
    """Seconds from `closed_at` to the first scrape showing both closes."""
    while True:
        now = closes(daemon, scenario)
        seen = time.monotonic()
        if now[0] > before[0] and now[1] > before[1]:
            return seen - closed_at
        if seen - closed_at > bound:
            raise TimeoutError(f"a close was not in /metrics after {bound}s ({before} -> {now})")
        time.sleep(POLL_S)


def close_to_metrics(
    loadgen: Loadgen,
    scenario: Scenario,
    daemon: DaemonProcess,
    samples: int,
    interval: float,
    rng: random.Random,
) -> list[float]:
    delays = []
    for _ in range(samples):
        time.sleep(rng.uniform(0, interval))
        before = closes(daemon, scenario)
        closed_at = loadgen.once(scenario.target)
        delays.append(wait_visible(daemon, scenario, before, closed_at, interval + 10))
    return delays
