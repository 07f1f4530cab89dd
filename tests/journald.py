"""A real, isolated systemd-journald for tests, on a host without systemd as PID 1.

How it is isolated (all as root):

    unshare --mount --propagation private       a mount namespace of its own, nothing leaks out
            --net                               and a network namespace, for the sysctl below
      setpriv --pdeathsig TERM                  dies with the test process, even on a crash
              --bounding-set -audit_read,-audit_control
                                                journald 252 would otherwise switch kernel
                                                auditing on for the whole host
        sh -c 'mount --bind ROOT/run /run &&
               echo 512 > /proc/sys/net/unix/max_dgram_qlen &&
               exec systemd-journald'

net.unix.max_dgram_qlen is per network namespace and fixed into a socket when it is made.
systemd as PID 1 raises it from the kernel's 10 to 512 at boot; this host has no systemd,
so without that a burst of 11 datagrams would already find journald's queue full. Unix
sockets with a path are reachable from any network namespace, so the test's own sockets
need nothing.

Inside the namespace journald sees ROOT/run as /run: it creates its sockets there
(systemd/journal/{socket,stdout,dev-log}), reads its config drop-in from
systemd/journald.conf.d/ and, with Storage=volatile, keeps the journal in log/journal/.
Outside, the test sends to ROOT/run/systemd/journal/socket and reads with
`journalctl -D ROOT/run/log/journal`. Stopping journald ends the namespace, which takes its
mount with it; the journal files stay in the pytest tmp dir.

Use `running_journald(dir)` as a context manager, or the `journald` fixture:

    from tests.journald import Journald, journald  # noqa: F401  (the fixture)

    def test_x(journald: Journald) -> None:
        send_to(journald.socket_path)
        assert journald.query("-t", "kmeshd")[0]["MESSAGE"] == "..."
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

JOURNALD = "/lib/systemd/systemd-journald"

# Only what isolation needs; journald's own defaults (rate limits included) stay in force.
JOURNALD_CONF = {
    "Storage": "volatile",  # never touch /var/log/journal
    "ReadKMsg": "no",  # the host's kernel log is not the test's business
    "ForwardToSyslog": "no",
    "ForwardToKMsg": "no",
    "ForwardToConsole": "no",
    "ForwardToWall": "no",
}

# The command prefix that isolates journald (see the module docstring for why each part).
ISOLATE = [
    "unshare", "--mount", "--propagation", "private", "--net",
    "setpriv", "--pdeathsig", "TERM", "--bounding-set", "-audit_read,-audit_control",
]  # fmt: skip

# --all: without it -o json shows fields over 4096 bytes as null.
JOURNALCTL_JSON = ["journalctl", "--all", "--no-pager", "--output=json"]

Query = Callable[..., list[dict[str, Any]]]


class Journald(NamedTuple):
    """A running test journald: where to send, and how to read back."""

    socket_path: str  # native protocol (what JournaldSink talks to)
    query: Query  # query(*journalctl_args) -> the matching entries, parsed from -o json
    stdout_path: str  # stream socket for stdout/stderr (StandardOutput=journal)
    syslog_path: str  # /dev/log equivalent
    journal_dir: str  # for journalctl -D
    pid: int


def _config(settings: Mapping[str, str]) -> str:
    return "[Journal]\n" + "".join(f"{key}={value}\n" for key, value in settings.items())


def _wait_for(paths: list[Path], proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            raise RuntimeError(f"systemd-journald exited {proc.returncode}: {log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"systemd-journald not ready in {timeout}s: {log.read_text()}")
        time.sleep(0.02)


def _query(pid: int, journal_dir: Path) -> Query:
    def query(*args: str) -> list[dict[str, Any]]:
        # --sync returns once journald has written everything sent before it. It speaks
        # varlink on /run/systemd/journal/io.systemd.journal, which only exists inside the
        # namespace, hence nsenter.
        subprocess.run(
            ["nsenter", f"--target={pid}", "--mount", "journalctl", "--sync"],
            check=True,
            capture_output=True,
        )
        out = subprocess.run(
            [*JOURNALCTL_JSON, f"--directory={journal_dir}", *args],
            check=False,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:  # no match is 0 with no output; this is a real error
            raise RuntimeError(f"journalctl {' '.join(args)}: {out.stderr}")
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    return query


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(str(path) in line for line in f)


@contextmanager
def running_journald(
    root: Path,
    config: Mapping[str, str] | None = None,
    dgram_qlen: int = 512,
    timeout: float = 10.0,
) -> Iterator[Journald]:
    """Start an isolated systemd-journald under `root`; stop it and its namespaces on exit.

    `config` adds or overrides journald.conf [Journal] settings (e.g. RateLimitBurst);
    `dgram_qlen` is the datagram queue of its sockets (512 as under systemd; small values
    let a test overrun journald).
    """
    for tool in ("unshare", "setpriv", "nsenter", "journalctl"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing (util-linux / systemd packages)")
    run = root / "run"
    journal = run / "systemd" / "journal"
    socket_path = journal / "socket"
    if len(str(socket_path)) >= 108:  # sun_path holds 108 bytes with the NUL
        raise RuntimeError(f"{socket_path}: too long for a unix socket address; use a shorter root")
    conf_d = run / "systemd" / "journald.conf.d"
    conf_d.mkdir(parents=True, exist_ok=True)  # exists when journald starts again on `root`
    for stale in ("socket", "stdout", "dev-log", "io.systemd.journal"):
        (journal / stale).unlink(missing_ok=True)  # a stopped journald's: wait for new ones
    (conf_d / "zz-kmeshd-test.conf").write_text(_config({**JOURNALD_CONF, **(config or {})}))
    log = root / "journald.log"
    script = 'mount --bind "$1" /run && echo "$2" > /proc/sys/net/unix/max_dgram_qlen && exec "$3"'
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*ISOLATE, "sh", "-c", script, "sh", str(run), str(dgram_qlen), JOURNALD],
            # Its own diagnostics to journald.log, not to the host's kernel log.
            env={**os.environ, "SYSTEMD_LOG_TARGET": "console"},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # ^C reaches pytest only; teardown stops journald
        )
    try:
        # The varlink socket is the last one journald creates before its event loop runs.
        _wait_for([socket_path, journal / "io.systemd.journal"], proc, log, timeout)
        yield Journald(
            socket_path=str(socket_path),
            query=_query(proc.pid, run / "log" / "journal"),
            stdout_path=str(journal / "stdout"),
            syslog_path=str(journal / "dev-log"),
            journal_dir=str(run / "log" / "journal"),
            pid=proc.pid,
        )
    finally:
        _stop(proc)
        if _mounted(run):  # the namespace died with journald; make sure nothing is left
            subprocess.run(["umount", "--lazy", str(run)], check=False)


@pytest.fixture
def journald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journald]:
    """An isolated, running systemd-journald (see the module docstring)."""
    if os.geteuid() != 0:
        pytest.skip("a real journald needs root (mount namespace)")
    with running_journald(tmp_path_factory.mktemp("journald")) as j:
        yield j
