"""`make bench`, part nine: what the split between `kmeshd load` and the unprivileged daemon
changes in the daemon's own footprint. A benchmark, not a test: it prints a table, writes
JSON, and fails only if it cannot run.

    .venv/bin/python -m tests.bench.privilege [--rounds N] [--out FILE]    # N=3

Side by side, N rounds alternating: (a) `kmeshd run` as root, which loads the probe in its
own process (bcc, clang and LLVM come in), as the unit ran it before; (b) `kmeshd load` as
root, then `kmeshd run` as user nobody holding CAP_BPF alone (setpriv), as the unit runs
them now. For each: the daemon's resident memory after three publishes (VmRSS) and its peak
(VmHWM), and the seconds from the first command to READY=1 (load included in (b)).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kmeshd.kernel.pins import remove_pins
from tests.bench.probes import stop_daemon
from tests.daemon_proc import DaemonProcess, value
from tests.test_kernel_privilege import UNPRIVILEGED

BPFFS = Path("/sys/fs/bpf")
LAST_PUBLISH = "kmeshd_last_publish_timestamp_seconds"
INVENTORY = """
[[workload]]
name = "bench-0"
workload = "bench"
addresses = ["10.244.93.2"]
"""


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(rest.split()[0])
    return fields


def one(unprivileged: bool, tmp: Path) -> dict[str, Any]:
    workdir = tmp / uuid.uuid4().hex[:8]
    workdir.mkdir(mode=0o777)
    workdir.chmod(0o777)
    pins = BPFFS / f"kmeshd-bench-privilege-{workdir.name}"
    daemon = DaemonProcess(workdir, INVENTORY, pins, interval="300ms", textfile=False)
    daemon.accesslog.parent.chmod(0o777)
    started = time.monotonic()
    try:
        if unprivileged:
            load = [sys.executable, "-m", "kmeshd.cli", "load", "--config", str(daemon.config)]
            subprocess.run([*load, "--user", "nobody"], check=True, capture_output=True)
        daemon.start(wrapper=UNPRIVILEGED if unprivileged else ())
        ready = time.monotonic() - started
        assert daemon.proc is not None
        first = value(daemon.samples(), LAST_PUBLISH)
        daemon.wait_for(lambda s: value(s, LAST_PUBLISH) >= first + 0.8, what="3 publishes")
        mem = memory(daemon.proc.pid)
    finally:
        stop_daemon(daemon)
        remove_pins(pins)
    return {"unprivileged": unprivileged, "ready_s": ready, **mem}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("tests/bench/out/privilege.json"))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kmeshd-bench-privilege-"))
    tmp.chmod(0o777)
    rows = []
    try:
        for i in range(args.rounds):
            for unprivileged in (i % 2 == 1, i % 2 == 0):
                rows.append(one(unprivileged, tmp))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nthe daemon's footprint: root loading in-process vs. `kmeshd load` + CAP_BPF only")
    print(f"{'daemon':<28}{'READY s':>9}{'VmRSS MiB':>11}{'VmHWM MiB':>11}")
    for unprivileged in (False, True):
        mine = [r for r in rows if r["unprivileged"] is unprivileged]
        name = "load + run (CAP_BPF, nobody)" if unprivileged else "run as root (loads itself)"
        print(
            f"{name:<28}{statistics.median(r['ready_s'] for r in mine):>9.2f}"
            f"{statistics.median(r['VmRSS'] for r in mine) / 1024:>11.1f}"
            f"{statistics.median(r['VmHWM'] for r in mine) / 1024:>11.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
