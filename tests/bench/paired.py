"""`make bench`, part four: what the probe costs the connection rate, measured in tight
pairs. A benchmark, not a test: it prints a table, writes JSON, and fails only if it cannot
run.

    .venv/bin/python -m tests.bench.paired [--pairs N] [--seconds S] [--out FILE]   # N=30, S=2

Why a second measure of the rate ratio: run.py starts a real kmeshd for every timed run,
so two runs it compares are some 15 s apart, and on a host whose speed drifts with other
tenants one invocation's ratios move by several hundredths. With the access log off,
kmeshd's user space does nothing per connection (run.py: 0.000-0.001 s of CPU per 10,000
connections; the sweep at each publish is sweep.py's figure): the cost to the churn is the
kernel program's. So here one process loads the probe exactly as the daemon does
(kmeshd.kernel.load and .probe: the same source, maps and known addresses; no socket sweep), keeps
the load generator's server up, and alternates S-second churns with the program attached
and detached, N pairs per scenario, the order flipping from pair to pair. Each pair gives
a ratio (attached / detached); the figures are their median and quartiles.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kmeshd.events import encode_address
from kmeshd.kernel import cgroup
from kmeshd.kernel.attach import attach
from kmeshd.kernel.load import load
from kmeshd.kernel.pins import remove_pins
from kmeshd.kernel.probe import Probe
from tests.bench import loadgen
from tests.bench.scenarios import Scenario, all_scenarios

BPFFS = Path("/sys/fs/bpf")
MAX_FLOWS = 65536  # load()'s default


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.paired", description=__doc__)
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "paired.json")
    return p.parse_args()


class Switch:
    """The daemon's probe, compiled and attached, knowing the scenario's addresses, that
    can be detached and attached again in a few milliseconds. The daemon never does this
    (it detaches once, at stop), so it lives here, on the probe's own handles; attaching
    again goes through kmeshd.kernel.attach.attach(), with a link pinned beside the probe's."""

    def __init__(self, probe: Probe, cgroup_dir: Path) -> None:
        self._probe, self._cgroup_dir = probe, cgroup_dir
        self._pin = probe._pins / "bench-link"
        self._link: int | None = None  # None: the link `load` made is the one attached
        libbpf = probe._libbpf  # the program behind that link (by id: root's privilege)
        self._prog = libbpf.check(
            libbpf.prog_get_fd_by_id(libbpf.link_prog_id(probe._link_fd)), "bpf_prog_get_fd_by_id"
        )

    def detach(self) -> None:
        libbpf = self._probe._libbpf
        if self._link is None:
            libbpf.link_detach(self._probe._link_fd)
            return
        libbpf.link_detach(self._link)
        os.close(self._link)
        self._pin.unlink()
        self._link = None

    def attach(self) -> None:
        self._link = attach(self._probe._libbpf, self._prog, self._cgroup_dir, self._pin)


@contextmanager
def switch_for(scenario: Scenario, workdir: Path) -> Iterator[Switch]:
    """The probe for `scenario`, attached; detached and its maps removed at the end."""
    pins = BPFFS / f"kmeshd-bench-paired-{workdir.name}"
    cgroup_dir = cgroup.directory("auto", "bench")
    load(pins, cgroup_dir, sweep=False)
    probe = Probe.open(pins, cgroup_dir, sweep=False, max_flows=MAX_FLOWS)
    switch = Switch(probe, cgroup_dir)
    try:
        probe.set_known(
            encode_address(ipaddress.ip_address(address)) for _, address in scenario.workloads
        )
        yield switch
    finally:
        switch.detach()
        probe.close(detach=False)
        remove_pins(pins)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def measure(gen: loadgen.Loadgen, scenario: Scenario, switch: Switch, args: Any) -> dict[str, Any]:
    """N pairs of churns, detached and attached, alternating which comes first."""
    pairs = []
    with gen.serving(scenario.target):
        gen.churn(scenario.target, 1.0)  # warm up, program attached
        switch.detach()
        for i in range(args.pairs):
            rates = {}
            for attached in (i % 2 == 1, i % 2 == 0):
                if attached:
                    switch.attach()
                rates[attached] = gen.churn(scenario.target, args.seconds).rate
                if attached:
                    switch.detach()
            pairs.append((rates[False], rates[True]))
            print(
                f"{scenario.name} pair {i + 1}/{args.pairs}: {rates[False]:,.0f} -> "
                f"{rates[True]:,.0f} conn/s ({rates[True] / rates[False]:.3f})",
                flush=True,
            )
        switch.attach()  # what switch_for detaches at the end
    ratios = [on / off for off, on in pairs]
    return {
        "scenario": scenario.name,
        "pairs": pairs,
        "baseline_median": statistics.median(off for off, _ in pairs),
        "ratio_quartiles": quartiles(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def report(results: list[dict[str, Any]], args: Any) -> None:
    print(
        f"\nprobe attached / detached, {args.pairs} pairs of {args.seconds:g} s churns per"
        " scenario (kmeshd's program and maps, access log off, no socket sweep)"
    )
    print(
        f"{'scenario':10}{'baseline conn/s':>17}{'ratio median':>14}{'quartiles':>16}{'range':>16}"
    )
    for r in results:
        q1, q2, q3 = r["ratio_quartiles"]
        spread = f"{q1:.3f}-{q3:.3f}"
        extremes = f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}"
        print(
            f"{r['scenario']:10}{r['baseline_median']:>17,.0f}{q2:>14.3f}{spread:>16}{extremes:>16}"
        )


def main() -> None:
    args = parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="kmeshd-bench-paired-") as tmp:
        workdir = Path(tmp)
        gen = loadgen.Loadgen(loadgen.build(workdir), loadgen.Load(4, 4, 128, 512))
        with all_scenarios() as scenarios:
            for scenario in scenarios:
                with switch_for(scenario, workdir) as switch:
                    results.append(measure(gen, scenario, switch, args))
    report(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"pairs": args.pairs, "seconds": args.seconds, "results": results}, indent=1)
    )
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
