"""Runs -> summary per scenario and configuration, a printed table, anomalies, JSON."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.bench.measure import KmeshdReport, RunResult

MIB = 1024 * 1024


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def per_10k(cpu: float | None, connections: int) -> float | None:
    return None if cpu is None or connections == 0 else cpu / connections * 10_000


def of(runs: list[RunResult], pick: Callable[[RunResult], float | None]) -> list[float]:
    return [v for v in map(pick, runs) if v is not None]


def kmeshd_of(runs: list[RunResult]) -> list[KmeshdReport]:
    return [r.kmeshd for r in runs if r.kmeshd is not None]


def paired_ratio(runs: list[RunResult], baseline: list[RunResult]) -> float | None:
    """Median over rounds of rate / the same round's baseline rate."""
    base = {r.round: r.churn.rate for r in baseline}
    ratios = [r.churn.rate / base[r.round] for r in runs if base.get(r.round)]
    return median(ratios)


def summarise_config(runs: list[RunResult], baseline: list[RunResult]) -> dict[str, Any]:
    rates = [r.churn.rate for r in runs]
    rate = statistics.median(rates)
    base = median([r.churn.rate for r in baseline])
    rss = of(runs, lambda r: r.peak_rss_bytes)
    reports = kmeshd_of(runs)
    summary: dict[str, Any] = {
        "runs": len(runs),
        "rate_median": rate,
        "rate_min": min(rates),
        "rate_max": max(rates),
        "ratio": rate / base if base else None,
        "ratio_paired": paired_ratio(runs, baseline),
        "loadgen_errors": sum(r.churn.errors for r in runs),
        "cpu_s_per_10k": median(of(runs, lambda r: per_10k(r.cpu_seconds, r.churn.connections))),
        "peak_rss_mib": max(rss) / MIB if rss else None,
    }
    if reports:
        summary.update(summarise_kmeshd(runs, reports))
    return summary


def summarise_kmeshd(runs: list[RunResult], reports: list[KmeshdReport]) -> dict[str, Any]:
    seconds = runs[0].churn.seconds
    pairs = [(r, r.kmeshd) for r in runs if r.kmeshd is not None]
    logged = [k for k in reports if k.log_lines is not None]
    return {
        "exact_runs": sum(k.exact for k in reports),
        "cpu_s_per_10k_caught_up": median(
            [per_10k(k.cpu_seconds_caught_up, r.churn.connections) or 0 for r, k in pairs]
        ),
        "log_records_per_s": median([k.log_lines / seconds for k in logged if k.log_lines]),
        "log_records_per_s_in_window": median(
            [k.log_lines_in_window / seconds for k in logged if k.log_lines_in_window is not None]
        ),
        "lost_median": median([k.lost for k in reports]),
        "lost_fraction_median": median(
            [k.lost / k.records_expected for k in reports if k.records_expected]
        ),
        "publish_age_at_end_max_s": max(k.publish_age_at_end_s for k in reports),
        "caught_up_max_s": max(k.caught_up_s for k in reports),
    }


def summarise(runs: list[RunResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for scenario in dict.fromkeys(r.scenario for r in runs):
        mine = [r for r in runs if r.scenario == scenario]
        baseline = [r for r in mine if r.config == "baseline"]
        out[scenario] = {
            config: summarise_config([r for r in mine if r.config == config], baseline)
            for config in dict.fromkeys(r.config for r in mine)
        }
    return out


# -- anomalies -------------------------------------------------------------------------------


def anomalies(runs: list[RunResult], interval: float) -> list[str]:
    found: list[str] = []
    for r in runs:
        where = f"round {r.round} {r.scenario} {r.config}"
        if r.churn.errors:
            found.append(f"{where}: loadgen counted {r.churn.errors} failed exchanges")
        want_attached = 1 if r.config.startswith("kmeshd") else 0
        if len(r.sock_ops_attached) != want_attached:
            found.append(f"{where}: sock_ops at the cgroup root: {r.sock_ops_attached}")
        if r.kmeshd is not None:
            found += kmeshd_anomalies(where, r.kmeshd, interval)
    return found


def kmeshd_anomalies(where: str, k: KmeshdReport, interval: float) -> list[str]:
    found = []
    if not k.exact:
        diff = {key: (k.counters[key], k.expected[key]) for key in k.counters}
        found.append(f"{where}: counters not exact (kmeshd, loadgen): {diff}")
    if k.exit_code not in (0, None):
        found.append(f"{where}: kmeshd exited {k.exit_code} after SIGTERM")
    if k.log_lines is not None and k.log_lines + k.lost != k.records_expected:
        found.append(
            f"{where}: access log {k.log_lines} lines + {k.lost} lost != "
            f"{k.records_expected} closes"
        )
    if k.publish_age_at_end_s > interval + 1:
        found.append(
            f"{where}: last publish was {k.publish_age_at_end_s:.1f}s old when the churn ended "
            f"(interval {interval:g}s): publishing was held up under load"
        )
    return found


# -- printing --------------------------------------------------------------------------------


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


RATE_HEADER = (
    f"{'config':<14}{'conn/s med':>11}{'min':>9}{'max':>9}{'ratio':>7}{'paired':>8}"
    f"{'CPU s/10k':>11}{'(+catch-up)':>12}{'peak RSS':>10}{'exact':>7}"
)
LOG_HEADER = (
    f"{'config':<14}{'lines/run s':>12}{'in-run/s':>10}{'lost med':>10}{'of closes':>11}"
    f"{'publish age':>13}{'catch-up':>10}"
)

LOG_LEGEND = [
    "  lines/run s: access-log lines at the end / run time (written during the run and the",
    "  catch-up after it); in-run/s: lines written during the timed window / run time;",
    "  lost: kmeshd_events_lost_total + kmeshd_accesslog_records_dropped_total (median run);",
    "  of closes: lost / (2 x connections), one record per socket; publish age: age of the",
    "  last publish when the churn ended (max); catch-up: end of churn -> checked publish (max)",
]


def rate_row(config: str, s: dict[str, Any]) -> str:
    exact = f"{s['exact_runs']}/{s['runs']}" if "exact_runs" in s else "-"
    rss = "-" if s["peak_rss_mib"] is None else f"{s['peak_rss_mib']:.0f} MiB"
    return (
        f"{config:<14}{s['rate_median']:>11,.0f}{s['rate_min']:>9,.0f}{s['rate_max']:>9,.0f}"
        f"{fmt(s['ratio'], '.3f'):>7}{fmt(s['ratio_paired'], '.3f'):>8}"
        f"{fmt(s['cpu_s_per_10k'], '.3f'):>11}{fmt(s.get('cpu_s_per_10k_caught_up'), '.3f'):>12}"
        f"{rss:>10}{exact:>7}"
    )


def log_row(config: str, s: dict[str, Any]) -> str:
    return (
        f"{config:<14}{fmt(s['log_records_per_s'], ',.0f'):>12}"
        f"{fmt(s['log_records_per_s_in_window'], ',.0f'):>10}{fmt(s['lost_median'], ',.0f'):>10}"
        f"{fmt(s['lost_fraction_median'], '.2%'):>11}"
        f"{s['publish_age_at_end_max_s']:>12.1f}s{s['caught_up_max_s']:>9.1f}s"
    )


def exactness_line(r: RunResult, k: KmeshdReport) -> str:
    def both(short: str) -> str:
        return f"{k.counters[short + '/source']}/{k.counters[short + '/destination']}"

    c = r.churn
    return (
        f"  r{r.round} {r.scenario:<8} {r.config:<12} exact: {'yes' if k.exact else 'NO'} | "
        f"loadgen: conns {c.connections}, req {c.request_bytes} B, rep {c.reply_bytes} B | "
        f"kmeshd source/destination: opened {both('opened')}, closed {both('closed')}, "
        f"received {both('received_bytes')}, sent {both('sent_bytes')}, failed {both('failed')}"
    )


def exactness_lines(runs: list[RunResult]) -> list[str]:
    return [exactness_line(r, r.kmeshd) for r in runs if r.kmeshd is not None]


def table(summary: dict[str, dict[str, Any]], runs: list[RunResult], describe: str) -> str:
    out = [describe, ""]
    for scenario, configs in summary.items():
        out += [f"== {scenario}", RATE_HEADER]
        out += [rate_row(config, s) for config, s in configs.items()]
        kmeshd = {c: s for c, s in configs.items() if "exact_runs" in s}
        if kmeshd:
            out += ["", "  access-log records (ring buffer -> file)", LOG_HEADER]
            out += [log_row(config, s) for config, s in kmeshd.items()]
            out += LOG_LEGEND
        out.append("")
    out += ["exactness per kmeshd run (counters for the benchmark's workloads):"]
    out += exactness_lines(runs)
    return "\n".join(out)


def latency_lines(latency: dict[str, Any] | None) -> list[str]:
    if not latency:
        return []
    return [
        f"close -> /metrics (idle kmeshd, metrics.interval {latency['interval_s']:g}s, "
        f"{len(latency['delays_s'])} samples): median {fmt(latency['median_s'], '.3f')}s, "
        f"max {fmt(latency['max_s'], '.3f')}s"
    ]


def cost_lines(costs: list[dict[str, Any]]) -> list[str]:
    return [
        f"sock_ops program, timed by the kernel ({c['scenario']}, {c['probe']}, "
        f"{c['connections']:,} "
        f"connections): {c['runs_per_connection']:.1f} runs per connection, "
        f"{c['ns_per_run']:.0f} ns per run, {c['ns_per_connection'] / 1000:.2f} µs per connection"
        for c in costs
    ]


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def runs_json(runs: list[RunResult]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        d = asdict(r)
        d["rate"] = r.churn.rate
        if r.kmeshd is not None:
            d["kmeshd"]["exact"] = r.kmeshd.exact
            d["kmeshd"]["lost"] = r.kmeshd.lost
        out.append(d)
    return out
