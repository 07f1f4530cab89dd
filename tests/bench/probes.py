"""What watches the churn: nothing, the real kmeshd, or bcc's tcplife; and what they cost.

Each probe is a context manager that yields once the probe is attached (kmeshd: READY=1 on
its NOTIFY_SOCKET; tcplife: its perf buffers are open), so start-up is never timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kmeshd.kernel import cgroup
from kmeshd.kernel.pins import remove_pins
from tests.daemon_proc import DaemonProcess

TCPLIFE = Path("/usr/sbin/tcplife-bpfcc")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Watcher:
    """A running probe: its process (None for the baseline) and, for kmeshd, the daemon."""

    pid: int | None
    daemon: DaemonProcess | None = None


def cpu_seconds(pid: int) -> float:
    """utime + stime of all the process's threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def sock_ops_attached() -> list[str]:
    """Programs attached to the cgroup v2 root (ours and any other prober's on this host)."""
    root = cgroup.directory("auto", "bench")
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(root)], capture_output=True, text=True, check=True
    ).stdout
    progs = json.loads(out) if out.strip() else []
    return [f"{p.get('attach_type')}:{p.get('name')}:{p.get('id')}" for p in progs]


# -- kmeshd --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonSettings:
    interval: str = "5s"  # metrics.interval
    accesslog_max_rate: int | None = None  # None: leave accesslog.max_rate at its default


@contextmanager
def kmeshd(
    workdir: Path,
    inventory: str,
    pin_dir: Path,
    *,
    accesslog: bool,
    settings: DaemonSettings,
    live_updates: bool = True,
) -> Iterator[Watcher]:
    """A started kmeshd; stopped with SIGTERM (its clean path) and its pins removed after."""
    workdir.mkdir(parents=True)
    # The benchmark's config: the default publish interval, no textfile, no journald, the
    # access-log file only when asked for.
    daemon = DaemonProcess(
        workdir,
        inventory,
        pin_dir,
        accesslog_file=accesslog,
        textfile=False,
        interval=settings.interval,
        max_rate=settings.accesslog_max_rate,
        bpf=f"live_updates = {str(live_updates).lower()}",
        metrics="",
    )
    try:
        daemon.start()
        assert daemon.proc is not None
        yield Watcher(daemon.proc.pid, daemon)
    finally:
        stop_daemon(daemon)
        remove_pins(pin_dir)


def stop_daemon(daemon: DaemonProcess) -> None:
    if daemon.proc is None or daemon.proc.poll() is not None:
        return
    try:
        daemon.stop(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()


# -- tcplife -------------------------------------------------------------------------------


def ensure_tcplife() -> None:
    if TCPLIFE.exists():
        return
    print("installing bpfcc-tools for tcplife-bpfcc", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "bpfcc-tools"],
        check=True,
        env=env,
    )


def perf_event_fds(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            count += os.readlink(fd) == "anon_inode:[perf_event]"
    return count


def possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return sum(
        int(part.split("-")[1]) - int(part.split("-")[0]) + 1 if "-" in part else 1
        for part in text.split(",")
    )


@contextmanager
def tcplife(workdir: Path, timeout: float = 120) -> Iterator[Watcher]:
    """tcplife-bpfcc, output to /dev/null; yields once its tracepoint and its two perf
    buffers (one event per CPU each) are open, i.e. it is attached and reading."""
    workdir.mkdir(parents=True)
    stderr_path = workdir / "tcplife.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen([str(TCPLIFE)], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_attached(proc, 1 + 2 * possible_cpus(), timeout, stderr_path)
        yield Watcher(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)  # tcplife exits cleanly on KeyboardInterrupt
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_attached(proc: subprocess.Popen[bytes], fds: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while perf_event_fds(proc.pid) < fds:
        if proc.poll() is not None:
            raise RuntimeError(f"tcplife-bpfcc exited {proc.returncode}: {log.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tcplife-bpfcc not attached in {timeout}s: {log.read_text()}")
        time.sleep(0.1)


# -- choosing ------------------------------------------------------------------------------

CONFIGS = ("baseline", "kmeshd-core", "kmeshd-nolog", "kmeshd-log", "tcplife")


@contextmanager
def watching(
    config: str, workdir: Path, inventory: str, pin_dir: Path, settings: DaemonSettings
) -> Iterator[Watcher]:
    """The probe of configuration `config`, running for the duration of the block."""
    if config == "baseline":
        yield Watcher(None)
    elif config in ("kmeshd-core", "kmeshd-nolog", "kmeshd-log"):
        log, live = config == "kmeshd-log", config != "kmeshd-core"
        with kmeshd(
            workdir, inventory, pin_dir, accesslog=log, settings=settings, live_updates=live
        ) as w:
            yield w
    elif config == "tcplife":
        with tcplife(workdir) as w:
            yield w
    else:
        raise ValueError(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")


# -- the probe's own run time --------------------------------------------------------------


@dataclass(frozen=True)
class ProgStats:
    runs: int
    run_time_ns: int


def prog_stats(name_prefix: str = "kmeshd", prog_type: str = "sock_ops") -> ProgStats:
    """run_cnt and run_time_ns summed over the loaded programs of `prog_type` named
    `name_prefix*` (counted only while kernel.bpf_stats_enabled is 1)."""
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout
    progs = [
        p
        for p in json.loads(out)
        if p.get("type") == prog_type and str(p.get("name", "")).startswith(name_prefix)
    ]
    return ProgStats(
        sum(int(p.get("run_cnt", 0)) for p in progs),
        sum(int(p.get("run_time_ns", 0)) for p in progs),
    )


@contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled on for the block: the kernel times every program run (at
    the price of two clock reads per run, which is why the timed rounds run without it)."""
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(before)
