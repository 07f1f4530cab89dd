"""`sudo make bench`: what kmeshd costs a host under TCP connection churn, and whether it
still counts every connection and byte exactly. A benchmark, not a test: it always
finishes, prints a table, writes JSON and lists anomalies; it fails only if it cannot run.

    .venv/bin/python -m tests.bench.run [options]       # or: make bench BENCH_ARGS="..."

Options:
    --rounds N            rounds (default 5); each round runs every configuration once
                          per scenario, so configurations alternate on a noisy machine
    --seconds S           length of each timed run (default 4)
    --quick               smoke run: 2 rounds x 2 s, 3 latency samples
    --configs LIST        comma-separated subset of
                          baseline,kmeshd-core,kmeshd-nolog,kmeshd-log,tcplife
                          (baseline is required: the ratios are against it)
    --scenarios LIST      comma-separated subset of loopback,netns (the latency samples
                          always use loopback)
    --client-threads N    `loadgen connect` threads (default 4)
    --server-threads N    `loadgen serve` threads (default 4)
    --request BYTES       request size per connection (default 128)
    --reply BYTES         reply size per connection (default 512)
    --interval DURATION   kmeshd metrics.interval (default "5s", kmeshd's default)
    --accesslog-max-rate N  set kmeshd's accesslog.max_rate (default: not set, so kmeshd's
                          own default applies; 0 = no limit)
    --latency-samples N   single connections timed from close to /metrics (default 10; 0 skips)
    --seed N              seed for the random moments of those connections (default 1)
    --out FILE            JSON results (default tests/bench/out/bench.json)

Scenarios (their own network namespaces, removed at the end, also on Ctrl-C or errors):
    loopback  client and server on 127.0.0.91 inside one namespace (see scenarios.py for why
              not 127.0.0.1), tcp_tw_reuse=1
    netns     two pods on a bridge, 10.244.91.2 -> 10.244.91.3

Configurations:
    baseline      no probe
    kmeshd-nolog  `kmeshd run` (READY=1 over NOTIFY_SOCKET), inventory naming the benchmark's
                  addresses, access log off, textfile off, its own bpf.pin_dir under /sys/fs/bpf
    kmeshd-log    the same with the access-log file on (journald off)
    kmeshd-core   kmeshd-nolog with bpf.live_updates = false: no socket sweep at each
                  publish, the counters of a connection change at its close only
    tcplife       bcc's tcplife-bpfcc, output to /dev/null (installed with apt-get if missing)

Each probe is started before its run and stopped after it, start-up outside the timed
window; the order of configurations rotates from round to round. Per run: connections/s
(loadgen's own count over the requested duration), the probe's CPU (utime + stime from
/proc/PID/stat over the window) and peak RSS (VmHWM); for kmeshd, the workload counters
from /metrics after the first publish made after the last close, compared with loadgen's
count (opened/closed for both reporters = connections, received_bytes = request bytes,
sent_bytes = reply bytes), and access-log lines vs. lost records. Then, on an idle
kmeshd, the delay from a close to its appearance in /metrics; and, per scenario, one more
churn per probe (kmeshd-core, kmeshd-nolog) with kernel.bpf_stats_enabled=1: the sock_ops
program's runs and run time per connection, as the kernel times them.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from kmeshd.config import parse_duration
from kmeshd.kernel.pins import remove_pins
from tests.bench import loadgen, report
from tests.bench.code import fingerprint
from tests.bench.latency import close_to_metrics
from tests.bench.measure import RunResult, measure
from tests.bench.probes import (
    CONFIGS,
    DaemonSettings,
    Watcher,
    bpf_stats,
    ensure_tcplife,
    kmeshd,
    prog_stats,
    watching,
)
from tests.bench.scenarios import SCENARIOS, Scenario, all_scenarios, inventory

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "bench.json"
BPFFS = Path("/sys/fs/bpf")
WARM_UP_S = 1.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--scenarios", default="loopback,netns")
    p.add_argument("--client-threads", type=int, default=4)
    p.add_argument("--server-threads", type=int, default=4)
    p.add_argument("--request", type=int, default=128)
    p.add_argument("--reply", type=int, default=512)
    p.add_argument("--interval", default="5s")
    p.add_argument("--accesslog-max-rate", type=int, default=None)
    p.add_argument("--latency-samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.latency_samples = 2, 2.0, min(args.latency_samples, 3)
    args.configs = args.configs.split(",")
    args.scenarios = args.scenarios.split(",")
    if set(args.configs) - set(CONFIGS) or "baseline" not in args.configs:
        p.error(f"--configs: one or more of {','.join(CONFIGS)}, baseline included")
    if not args.scenarios or set(args.scenarios) - set(SCENARIOS):
        p.error(f"--scenarios: one or more of {','.join(SCENARIOS)}")
    return args


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rotated(configs: list[str], by: int) -> list[str]:
    by %= len(configs)
    return configs[by:] + configs[:by]


def schedule(
    rounds: int, scenarios: list[Scenario], configs: list[str]
) -> Iterator[tuple[int, Scenario, str]]:
    for round_no in range(1, rounds + 1):
        for scenario in scenarios:
            for config in rotated(configs, round_no - 1):
                yield round_no, scenario, config


def with_exit_code(result: RunResult, watcher: Watcher) -> RunResult:
    daemon = watcher.daemon
    if result.kmeshd is None or daemon is None or daemon.proc is None:
        return result
    return replace(result, kmeshd=replace(result.kmeshd, exit_code=daemon.proc.returncode))


def one_line(r: RunResult) -> str:
    text = f"{r.churn.rate:>9,.0f} conn/s"
    if r.kmeshd is not None:
        text += f", exact: {'yes' if r.kmeshd.exact else 'NO'}, lost {r.kmeshd.lost}"
    return text


@dataclass
class Bench:
    workdir: Path
    loadgen: loadgen.Loadgen
    inventory: str
    pins: Path
    args: argparse.Namespace
    runs_started: int = 0

    def fresh(self, name: str) -> tuple[Path, Path]:
        """A work directory and a bpf.pin_dir of its own for the next run."""
        self.runs_started += 1
        tag = f"{self.runs_started:03d}-{name}"
        return self.workdir / tag, self.pins / tag

    def one(self, round_no: int, scenario: Scenario, config: str) -> RunResult:
        workdir, pin_dir = self.fresh(f"{scenario.name}-{config}")
        with watching(config, workdir, self.inventory, pin_dir, self.daemon_settings()) as watcher:
            result = measure(self.loadgen, scenario, watcher, self.args.seconds, (round_no, config))
        shutil.rmtree(workdir, ignore_errors=True)  # the access log can be large
        return with_exit_code(result, watcher)

    def daemon_settings(self) -> DaemonSettings:
        return DaemonSettings(self.args.interval, self.args.accesslog_max_rate)

    def rounds(self, scenarios: list[Scenario]) -> list[RunResult]:
        plan = list(schedule(self.args.rounds, scenarios, self.args.configs))
        runs = []
        for i, (round_no, scenario, config) in enumerate(plan, start=1):
            result = self.one(round_no, scenario, config)
            progress(f"[{i}/{len(plan)}] r{round_no} {scenario.name} {config}: {one_line(result)}")
            runs.append(result)
        return runs

    def latency(self, scenario: Scenario) -> dict[str, Any]:
        interval = parse_duration(self.args.interval)
        workdir, pin_dir = self.fresh("latency")
        progress(f"close -> /metrics: {self.args.latency_samples} samples on an idle kmeshd")
        with kmeshd(
            workdir, self.inventory, pin_dir, accesslog=False, settings=self.daemon_settings()
        ) as watcher:
            assert watcher.daemon is not None
            rng = random.Random(self.args.seed)
            delays = close_to_metrics(
                self.loadgen, scenario, watcher.daemon, self.args.latency_samples, interval, rng
            )
        return {
            "scenario": scenario.name,
            "interval_s": interval,
            "delays_s": delays,
            "median_s": statistics.median(delays),
            "max_s": max(delays),
        }

    def program_cost(self, scenario: Scenario, live_updates: bool) -> dict[str, Any]:
        """The sock_ops program's own run time per connection, timed by the kernel
        (bpf_stats) during one churn: steadier than rate ratios on a noisy host."""
        workdir, pin_dir = self.fresh(f"{scenario.name}-cost-{live_updates}")
        settings = self.daemon_settings()
        daemon = kmeshd(
            workdir,
            self.inventory,
            pin_dir,
            accesslog=False,
            settings=settings,
            live_updates=live_updates,
        )
        with daemon, bpf_stats():
            before = prog_stats()
            churn = self.loadgen.churn(scenario.target, self.args.seconds)
            after = prog_stats()
        runs, ns = after.runs - before.runs, after.run_time_ns - before.run_time_ns
        conns = max(churn.connections, 1)
        return {
            "scenario": scenario.name,
            "probe": "kmeshd-nolog" if live_updates else "kmeshd-core",
            "connections": churn.connections,
            "runs_per_connection": runs / conns,
            "ns_per_run": ns / max(runs, 1),
            "ns_per_connection": ns / conns,
        }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items() if key != "quick"
    } | {"quick": args.quick}


def host() -> dict[str, Any]:
    return {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe(args: argparse.Namespace) -> str:
    return (
        f"kmeshd benchmark: {args.rounds} rounds x {args.seconds:g} s per configuration, "
        f"alternating; loadgen {args.client_threads} client / {args.server_threads} server "
        f"threads, {args.request} B request, {args.reply} B reply per connection; "
        f"ratio = median conn/s / baseline median, paired = median of per-round ratios; "
        f"CPU = probe process utime+stime in the timed window (+catch-up: until kmeshd had "
        f"published and written every record)"
    )


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        binary = loadgen.build(tmp)
        load = loadgen.Load(args.client_threads, args.server_threads, args.request, args.reply)
        gen = loadgen.Loadgen(binary, load)
        every = stack.enter_context(all_scenarios())
        scenarios = [s for s in every if s.name in args.scenarios]
        pins = BPFFS / f"kmeshd-bench-{uuid.uuid4().hex[:8]}"
        stack.callback(remove_pins, pins)
        for scenario in every:  # loopback serves the latency samples, whatever was chosen
            stack.enter_context(gen.serving(scenario.target))
        for scenario in scenarios:
            gen.churn(scenario.target, WARM_UP_S)
        bench = Bench(tmp, gen, inventory(every), pins, args)
        started = {"host": host(), "settings": settings(args), "code": fingerprint()}
        runs = bench.rounds(scenarios)
        loop = [s for s in every if s.name == "loopback"]
        latency = bench.latency(loop[0]) if args.latency_samples > 0 else None
        cost = [bench.program_cost(s, live) for s in scenarios for live in (False, True)]
    ended = {"loadavg_end": os.getloadavg(), "code_end": fingerprint()}
    return started | ended | {"runs": runs, "latency": latency, "program_cost": cost}


def stop_on_sigterm() -> None:
    def _exit(_sig: int, _frame: FrameType | None) -> None:
        raise SystemExit(143)  # unwinds every `with`: namespaces, daemons, pins go away

    signal.signal(signal.SIGTERM, _exit)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("make bench needs root (eBPF, network namespaces): sudo make bench", file=sys.stderr)
        return 2
    stop_on_sigterm()
    if "tcplife" in args.configs:
        ensure_tcplife()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="kmeshd-bench-") as tmp:
            result = run(args, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted: namespaces, daemons and pins removed", file=sys.stderr)
        return 130
    runs: list[RunResult] = result.pop("runs")
    interval = parse_duration(args.interval)
    summary = report.summarise(runs)
    found = report.anomalies(runs, interval)
    if result["code"] != result["code_end"]:
        found.append(
            f"kmeshd's sources changed during the benchmark ({result['code']} -> "
            f"{result['code_end']}): the runs mix versions; run it again"
        )
    document = result | {
        "elapsed_s": time.monotonic() - started,
        "summary": summary,
        "anomalies": found,
        "runs": report.runs_json(runs),
    }
    report.write_json(args.out, document)
    print(report.table(summary, runs, describe(args)))
    print("\n".join(["", *report.latency_lines(result["latency"])]))
    print("\n".join(["", *report.cost_lines(result["program_cost"])]))
    print("\n".join(["", "anomalies:", *(f"  {a}" for a in found or ["none"])]))
    print(f"\nJSON: {args.out}  ({document['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
