"""One timed churn under one probe, and, for kmeshd, what it reported about that churn.

The timed window is the load generator's own run. For kmeshd the benchmark then waits
until the kernel has closed every socket of the churn (a client socket stays in LAST_ACK
until its FIN is acknowledged, and under load that may take a retransmission, seconds
after the load generator exited), then for a publish that started after that (and, with
the access log on, until the log holds every record not counted as lost), scrapes
/metrics once, and compares.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench.loadgen import Churn, Loadgen, Target, in_netns
from tests.bench.probes import Watcher, cpu_seconds, peak_rss_bytes, sock_ops_attached
from tests.bench.scenarios import Scenario
from tests.daemon_proc import DaemonProcess, Samples, value

SETTLE_S = 0.5  # after the last socket closed, a publish that started later saw it
SOCKETS_CLOSED_TIMEOUT_S = 60.0
STALL_S = 3.0  # an access log that has not grown for this long has caught up
CATCH_UP_TIMEOUT_S = 180.0
POLL_S = 0.2

COUNTERS = (
    ("opened", "kmesh_tcp_workload_connections_opened_total"),
    ("closed", "kmesh_tcp_workload_connections_closed_total"),
    ("received_bytes", "kmesh_tcp_workload_received_bytes_total"),
    ("sent_bytes", "kmesh_tcp_workload_sent_bytes_total"),
    ("failed", "kmesh_tcp_workload_connections_failed_total"),
)
REPORTERS = ("source", "destination")


@dataclass(frozen=True)
class KmeshdReport:
    counters: dict[str, int]  # "opened/source" -> value, for the scenario's two workloads
    expected: dict[str, int]  # the same keys, from the load generator's own count
    events_lost: int  # kmeshd_events_lost_total: ring-buffer records the kernel dropped
    records_dropped: int  # kmeshd_accesslog_records_dropped_total, all sinks
    records_expected: int  # one access record per socket closed: two per connection
    log_lines: int | None  # access-log file lines once caught up (None: log off)
    log_lines_in_window: int | None  # ... when the churn ended
    publish_age_at_end_s: float  # how old the last publish was when the churn ended
    caught_up_s: float  # from the end of the churn to the publish that was checked
    cpu_seconds_caught_up: float  # daemon CPU from the window's start until then
    exit_code: int | None = None  # after SIGTERM; filled in once the daemon has stopped

    @property
    def exact(self) -> bool:
        return self.counters == self.expected

    @property
    def lost(self) -> int:
        return self.events_lost + self.records_dropped


@dataclass(frozen=True)
class RunResult:
    round: int
    scenario: str
    config: str
    churn: Churn
    cpu_seconds: float | None  # the probe process's utime + stime over the timed window
    peak_rss_bytes: int | None  # VmHWM at the end
    sock_ops_attached: list[str]  # at the cgroup root when the run started
    kmeshd: KmeshdReport | None


class LineCounter:
    """Counts the lines of a growing file, reading only what is new each time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def count(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            while chunk := f.read(1 << 20):
                self.lines += chunk.count(b"\n")
                self.offset += len(chunk)
        return self.lines


def measure(
    loadgen: Loadgen, scenario: Scenario, watcher: Watcher, seconds: float, where: tuple[int, str]
) -> RunResult:
    round_no, config = where
    attached = sock_ops_attached()
    pid, daemon = watcher.pid, watcher.daemon
    lines = LineCounter(daemon.accesslog) if daemon and daemon.accesslog_enabled else None
    cpu_before = cpu_seconds(pid) if pid else 0.0
    churn = loadgen.churn(scenario.target, seconds)
    ended = time.time()
    cpu = cpu_seconds(pid) - cpu_before if pid else None
    report = None
    if daemon is not None:
        report = check_kmeshd(daemon, scenario, churn, ended, lines, cpu_before)
    rss = peak_rss_bytes(pid) if pid else None
    return RunResult(round_no, scenario.name, config, churn, cpu, rss, attached, report)


def check_kmeshd(
    daemon: DaemonProcess,
    scenario: Scenario,
    churn: Churn,
    ended: float,
    lines: LineCounter | None,
    cpu_before: float,
) -> KmeshdReport:
    assert daemon.proc is not None
    in_window = lines.count() if lines else None
    publish_age = ended - value(daemon.samples(), "kmeshd_last_publish_timestamp_seconds")
    records = 2 * churn.connections
    closed = wait_sockets_closed(scenario.target)
    samples = wait_caught_up(daemon, closed + SETTLE_S, lines, records)
    return KmeshdReport(
        counters=workload_counters(samples, scenario),
        expected=expected_counters(churn),
        events_lost=int(value(samples, "kmeshd_events_lost_total")),
        records_dropped=int(value(samples, "kmeshd_accesslog_records_dropped_total")),
        records_expected=records,
        log_lines=lines.count() if lines else None,
        log_lines_in_window=in_window,
        publish_age_at_end_s=publish_age,
        caught_up_s=time.time() - ended,
        cpu_seconds_caught_up=cpu_seconds(daemon.proc.pid) - cpu_before,
    )


def open_sockets(target: Target) -> int:
    """Sockets of the churn not yet closed, on both sides (TIME_WAIT and the listener
    are closed as far as kmeshd is concerned)."""
    count = 0
    for netns in {target.client_netns, target.server_netns}:
        out = subprocess.run(
            in_netns(netns, "ss", "-Htan", "state", "all", "exclude", "time-wait", "exclude",
                     "listening", f"( dport = :{target.port} or sport = :{target.port} )"),
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        count += len(out.splitlines())
    return count


def wait_sockets_closed(target: Target) -> float:
    """When the last socket of the churn closed (time.time())."""
    deadline = time.monotonic() + SOCKETS_CLOSED_TIMEOUT_S
    while open_sockets(target) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return time.time()


def lost(samples: Samples) -> int:
    return int(
        value(samples, "kmeshd_events_lost_total")
        + value(samples, "kmeshd_accesslog_records_dropped_total")
    )


def wait_caught_up(
    daemon: DaemonProcess, after: float, lines: LineCounter | None, records: int
) -> Samples:
    """The first scrape of a publish made after `after` at which the access log (if on)
    holds every record not counted as lost, or at which it had stopped growing."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    last_lines, changed = -1, time.time()
    while True:
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise RuntimeError(f"kmeshd exited {daemon.proc.returncode}: {daemon.stderr()}")
        samples = daemon.samples()
        published = value(samples, "kmeshd_last_publish_timestamp_seconds")
        if lines is None:
            if published >= after:
                return samples
        else:
            now_lines = lines.count()
            if now_lines != last_lines:
                last_lines, changed = now_lines, time.time()
            complete = now_lines + lost(samples) >= records
            stalled = time.time() - changed >= STALL_S and published >= changed
            if published >= after and (complete or stalled):
                return samples
        if time.monotonic() > deadline:
            raise TimeoutError(f"kmeshd did not catch up in {CATCH_UP_TIMEOUT_S}s")
        time.sleep(POLL_S)


def workload_counters(samples: Samples, scenario: Scenario) -> dict[str, int]:
    ends = {
        "source_workload": scenario.source_workload,
        "destination_workload": scenario.destination_workload,
    }
    return {
        f"{short}/{reporter}": int(value(samples, metric, reporter=reporter, **ends))
        for short, metric in COUNTERS
        for reporter in REPORTERS
    }


def expected_counters(churn: Churn) -> dict[str, int]:
    per_reporter = {
        "opened": churn.connections,
        "closed": churn.connections,
        "received_bytes": churn.request_bytes,  # the destination received the requests
        "sent_bytes": churn.reply_bytes,  # and sent the replies
        "failed": 0,
    }
    return {
        f"{short}/{reporter}": per_reporter[short]
        for short, _ in COUNTERS
        for reporter in REPORTERS
    }
