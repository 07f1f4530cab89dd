"""`make bench`, part two: what kmeshd costs one long bulk transfer, the case any
per-packet probe would hurt (kmeshd has none: live bytes come from a socket sweep at each
publish). A benchmark, not a test: it prints a table,
writes JSON, and fails only if it cannot run.

    .venv/bin/python -m tests.bench.bulk [--rounds N] [--seconds S] [--out FILE]

Per scenario (loopback, netns: see scenarios.py) and round, one `loadgen bulk` transfer for
S seconds under each configuration, in an order that rotates from round to round:
baseline (no probe), kmeshd-core (live updates off), kmeshd (live updates on, kmeshd's
default; access log off in both). Reported: throughput (bytes read by the sink per second),
its ratio to the baseline (median of the rounds, and the median of each round's own
ratio), kmeshd's CPU seconds during the transfer (user-space work), and whether the
transfer's bytes are in /metrics exactly, for both reporters. Then one more transfer per
scenario with live updates on and kernel.bpf_stats_enabled=1: the sock_ops program's runs
and run time per GB, and its run time as a share of the transfer's (steadier than ratios
on a noisy host; near zero when no callback runs per packet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.bench import loadgen
from tests.bench.loadgen import Target, in_netns
from tests.bench.probes import DaemonSettings, bpf_stats, cpu_seconds, kmeshd, prog_stats
from tests.bench.scenarios import Scenario, all_scenarios, inventory
from tests.daemon_proc import DaemonProcess, value

CONFIGS = ("baseline", "kmeshd-core", "kmeshd")
BPFFS = Path("/sys/fs/bpf")
W = "kmesh_tcp_workload_"


@dataclass(frozen=True)
class Transfer:
    scenario: str
    config: str
    round: int
    bytes: int
    seconds: float
    daemon_cpu_s: float | None = None
    exact: bool | None = None  # kmeshd: received_bytes of both reporters == bytes

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds


@contextmanager
def sink(binary: Path, target: Target) -> Iterator[None]:
    argv = in_netns(target.server_netns, str(binary), "sink", target.address, str(target.port))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def transfer(binary: Path, target: Target, seconds: float) -> tuple[int, float]:
    argv = in_netns(
        target.client_netns, str(binary), "bulk", target.address, str(target.port), str(seconds)
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    size, elapsed = out.stdout.split()
    return int(size), float(elapsed)


def counted(daemon: DaemonProcess, scenario: Scenario, size: int) -> bool:
    """Both reporters' received bytes equal the transfer, within a few publishes."""
    labels = {
        "source_workload": scenario.source_workload,
        "destination_workload": scenario.destination_workload,
    }
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = daemon.samples()
        got = [
            value(s, W + "received_bytes_total", reporter=r, **labels)
            for r in ("source", "destination")
        ]
        if got == [size, size]:
            return True
        time.sleep(0.2)
    return False


def run_one(
    binary: Path, scenario: Scenario, config: str, rnd: int, seconds: float, tmp: Path, inv: str
) -> Transfer:
    if config == "baseline":
        size, elapsed = transfer(binary, scenario.target, seconds)
        return Transfer(scenario.name, config, rnd, size, elapsed)
    pins = BPFFS / f"kmeshd-bulk-{uuid.uuid4().hex[:8]}"
    workdir = tmp / f"{scenario.name}-{config}-{rnd}"
    settings = DaemonSettings(interval="1s")
    live = config == "kmeshd"
    with kmeshd(workdir, inv, pins, accesslog=False, settings=settings, live_updates=live) as w:
        assert w.pid is not None and w.daemon is not None
        before = cpu_seconds(w.pid)
        size, elapsed = transfer(binary, scenario.target, seconds)
        cpu = cpu_seconds(w.pid) - before
        exact = counted(w.daemon, scenario, size)
    return Transfer(scenario.name, config, rnd, size, elapsed, cpu, exact)


def program_time(
    binary: Path, scenario: Scenario, seconds: float, tmp: Path, inv: str
) -> dict[str, float | str]:
    """The probe's own run time during one transfer, as the kernel measures it."""
    pins = BPFFS / f"kmeshd-bulk-{uuid.uuid4().hex[:8]}"
    workdir = tmp / f"{scenario.name}-stats"
    with kmeshd(workdir, inv, pins, accesslog=False, settings=DaemonSettings("1s")), bpf_stats():
        before = prog_stats()
        size, elapsed = transfer(binary, scenario.target, seconds)
        after = prog_stats()
    runs, ns = after.runs - before.runs, after.run_time_ns - before.run_time_ns
    gb = size / 1e9
    return {
        "scenario": scenario.name,
        "gbit_s": size * 8 / elapsed / 1e9,
        "runs_per_gb": runs / gb,
        "us_per_gb": ns / 1e3 / gb,
        "share_of_transfer": ns / (elapsed * 1e9),
    }


def summarize(results: list[Transfer]) -> list[dict[str, object]]:
    rows = []
    for scenario in sorted({r.scenario for r in results}):
        base = {
            r.round: r.rate for r in results if r.scenario == scenario and r.config == "baseline"
        }
        for config in CONFIGS:
            runs = [r for r in results if r.scenario == scenario and r.config == config]
            rate = statistics.median(r.rate for r in runs)
            paired = statistics.median(r.rate / base[r.round] for r in runs)
            cpu = [r.daemon_cpu_s for r in runs if r.daemon_cpu_s is not None]
            rows.append(
                {
                    "scenario": scenario,
                    "config": config,
                    "gbit_s": rate * 8 / 1e9,
                    "ratio": rate / statistics.median(base.values()),
                    "paired": paired,
                    "daemon_cpu_s": max(cpu) if cpu else None,
                    "exact": f"{sum(bool(r.exact) for r in runs)}/{len(runs)}"
                    if config != "baseline"
                    else "-",
                }
            )
    return rows


def print_table(rows: list[dict[str, object]], seconds: float) -> None:
    print(f"\nbulk transfer, one connection, {seconds:g} s per run")
    print(f"{'scenario':<9} {'config':<12} {'Gbit/s':>7} {'ratio':>6} {'paired':>7} "
          f"{'daemon CPU s':>12}  exact")  # fmt: skip
    for r in rows:
        cpu = "-" if r["daemon_cpu_s"] is None else f"{r['daemon_cpu_s']:.2f}"
        print(
            f"{r['scenario']:<9} {r['config']:<12} {r['gbit_s']:>7.2f} {r['ratio']:>6.3f} "
            f"{r['paired']:>7.3f} {cpu:>12}  {r['exact']}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--out", type=Path, default=Path("tests/bench/out/bulk.json"))
    args = p.parse_args()
    results: list[Transfer] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kmeshd-bulk-")))
        binary = loadgen.build(tmp)
        scenarios = stack.enter_context(all_scenarios())
        inv = inventory(scenarios)
        for scenario in scenarios:
            stack.enter_context(sink(binary, scenario.target))
        for rnd in range(1, args.rounds + 1):
            order = CONFIGS[rnd % 3 :] + CONFIGS[: rnd % 3]
            for scenario in scenarios:
                for config in order:
                    t = run_one(binary, scenario, config, rnd, args.seconds, tmp, inv)
                    results.append(t)
                    print(f"r{rnd} {scenario.name} {config}: {t.rate * 8 / 1e9:.2f} Gbit/s",
                          flush=True)  # fmt: skip
        stats = [program_time(binary, sc, args.seconds, tmp, inv) for sc in scenarios]
    rows = summarize(results)
    print_table(rows, args.seconds)
    for st in stats:
        print(
            f"sock_ops program, timed by the kernel ({st['scenario']}, {st['gbit_s']:.1f} Gbit/s):"
            f" {st['runs_per_gb']:,.0f} runs per GB, {st['us_per_gb']:,.0f} µs per GB,"
            f" {st['share_of_transfer']:.3%} of the transfer's time"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"rows": rows, "program": stats, "runs": [asdict(r) for r in results]}, indent=1)
    )
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
