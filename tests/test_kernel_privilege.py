"""The daemon without privileges, as the unit runs it: `kmeshd load` as root, then `kmeshd
run` as another user holding CAP_BPF alone (setpriv), with real eBPF and pods in network
namespaces it cannot enter. It must count exactly, read open connections' bytes in every
namespace, count the sockets its sweep cannot reach, and detach at a clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from kmeshd.events import encode_address
from kmeshd.kernel import cgroup
from kmeshd.kernel.layout import FLOW_KEY
from kmeshd.kernel.load import load
from kmeshd.kernel.probe import Probe
from tests.daemon_proc import DaemonProcess, value
from tests.e2e import (
    INVENTORY,
    W,
    attached_probes,
    both,
    closed,
    exchange,
    hold,
    release,
    serve,
)
from tests.netns import Pod, is_root

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not is_root(), reason="real eBPF needs root"),
]

REPO = Path(__file__).resolve().parent.parent
CAP_BPF = 39
# As the unit runs it: user nobody here (kmeshd there), CAP_BPF and nothing else.
UNPRIVILEGED = (
    "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
    "--inh-caps=-all,+bpf", "--ambient-caps=-all,+bpf", "--bounding-set=-all,+bpf",
)  # fmt: skip


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory user nobody can write in (pytest's own are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="kmeshd-unprivileged-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def load_and_start(d: DaemonProcess) -> None:
    """As the unit starts kmeshd: `kmeshd load` as root, then the daemon unprivileged."""
    load = subprocess.run(
        [sys.executable, "-m", "kmeshd.cli", "load", "--config", str(d.config), "--user", "nobody"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert load.returncode == 0, load.stderr
    assert "probe attached to /sys/fs/cgroup" in load.stdout
    d.start(wrapper=UNPRIVILEGED)


@pytest.fixture
def daemon(workdir: Path, pin_dir: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(workdir, INVENTORY, pin_dir, interval="300ms")
    for path in (d.textfile.parent, d.accesslog.parent):
        path.chmod(0o777)
    load_and_start(d)
    yield d
    d.close()


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_the_daemon_holds_cap_bpf_alone_and_no_bcc(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    st = status(daemon.proc.pid)
    assert st["Uid"].split() == ["65534"] * 4
    for kind in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[kind], 16) == 1 << CAP_BPF, kind
    maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    assert "libbcc" not in maps and "libLLVM" not in maps


def test_open_connections_in_other_namespaces_show_their_bytes_exactly(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """A 292/5 exchange on a connection that stays open between two pods: both reporters
    show it exactly while it is open (the sweep reached both namespaces without entering
    either), every open socket was read, and the close adds nothing twice."""
    server = serve(pods["server"], 1)
    held = hold(pods["client"], pods["server"].ip4, 292, 5, 80)
    s = daemon.wait_for(
        lambda s: both(s, "received_bytes_total") == [292, 292], what="live bytes while open"
    )
    assert both(s, "sent_bytes_total") == [5, 5]
    assert both(s, "connections_opened_total") == [1, 1]
    assert both(s, "connections_closed_total") == [0, 0]
    assert value(s, "kmeshd_sweep_sockets_unreached") == 0
    release(held)
    assert server.wait(timeout=30) == 0
    s = daemon.wait_for(closed(1), what="the close")
    time.sleep(0.7)  # two more publishes: nothing may be added again
    s = daemon.samples()
    assert both(s, "received_bytes_total") == [292, 292]
    assert both(s, "sent_bytes_total") == [5, 5]
    assert both(s, "connections_closed_total") == [1, 1]


LISTEN_ONLY = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 81))
s.listen()
print("listening", flush=True)
sys.stdin.readline()
"""
CONNECT_AND_SEND = """
import socket, sys
c = socket.create_connection((sys.argv[1], 81))
c.sendall(b"x" * 100)
print("sent", flush=True)
sys.stdin.readline()
c.close()
"""


def test_a_socket_no_process_holds_is_counted_unreached_and_exact_at_close(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """A connection the server never accept()ed sits in the accept queue with no file
    descriptor: the sweep reads the client's end, counts the server's as unreached, and
    the server's close (its listener goes) brings its bytes in exactly."""
    server, client = pods["server"], pods["client"]
    listener = subprocess.Popen(
        server.exec(sys.executable, "-c", LISTEN_ONLY),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
    sender = subprocess.Popen(
        client.exec(sys.executable, "-c", CONNECT_AND_SEND, server.ip4),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sender.stdout is not None and sender.stdout.readline().strip() == "sent"
    s = daemon.wait_for(
        lambda s: value(s, "kmeshd_sweep_sockets_unreached") == 1
        and value(s, W + "received_bytes_total", reporter="source") == 100,
        what="the client's end read, the server's unreached",
    )
    assert value(s, W + "received_bytes_total", reporter="destination") == 0
    for proc in (sender, listener):
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    s = daemon.wait_for(closed(1), what="both ends closed")
    assert both(s, "received_bytes_total") == [100, 100]
    assert value(s, "kmeshd_sweep_sockets_unreached") == 0


def test_a_restart_as_the_unit_does_it_counts_every_connection_once(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """Stop, load again (which hands the pins over again) and start: the counters carry
    over from the state file against the same kernel map, neither doubled nor lost."""
    exchange(pods, [(292, 5, 0), (100, 7, 0)])
    s = daemon.wait_for(closed(2), what="two connections")
    assert both(s, "received_bytes_total") == [392, 392]
    assert daemon.stop(signal.SIGTERM) == 0
    load_and_start(daemon)
    time.sleep(1)  # three publishes
    s = daemon.samples()
    assert both(s, "connections_opened_total") == [2, 2]
    assert both(s, "received_bytes_total") == [392, 392]
    exchange(pods, [(20, 1, 0)])
    s = daemon.wait_for(closed(3), what="the third connection")
    assert both(s, "connections_opened_total") == [3, 3]
    assert both(s, "received_bytes_total") == [412, 412]


def test_pins_opened_again_without_a_load_go_on_from_the_last_daemon(
    pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """The probe as a daemon opens it: after a fresh load, generation 0 and the keys the
    load kept; opened again with no load between (a daemon killed and started by hand),
    the generation the last one set and every entry of the same program's map."""
    cgroup_dir = cgroup.directory("auto", "test")
    load(pin_dir, cgroup_dir, sweep=False)
    probe = Probe.open(pin_dir, cgroup_dir, sweep=False, max_flows=65536)
    assert (probe.generation, probe.keys_at_start()) == (0, set())
    probe.set_known([encode_address(ip_address(pods["server"].ip4))])
    exchange(pods, [(292, 5, 0)])
    assert probe.new_generation() == 1
    size = FLOW_KEY.size
    keys = {
        e.keys[at : at + size] for e in probe.flow_entries() for at in range(0, len(e.keys), size)
    }
    assert len(keys) == 2  # both reporters, generation 0
    probe.close(detach=False)
    again = Probe.open(pin_dir, cgroup_dir, sweep=False, max_flows=65536)
    assert (again.generation, again.keys_at_start()) == (1, keys)
    again.close(detach=False)
    load(pin_dir, cgroup_dir, sweep=False)  # a new program: generation 0, the keys it kept
    fresh = Probe.open(pin_dir, cgroup_dir, sweep=False, max_flows=65536)
    assert (fresh.generation, fresh.keys_at_start()) == (0, keys)
    fresh.close(detach=True)


def test_a_clean_stop_detaches_without_privileges(daemon: DaemonProcess) -> None:
    before = attached_probes()
    assert daemon.stop(signal.SIGTERM) == 0
    assert attached_probes() == before - 1


def test_run_without_a_loaded_probe_says_what_to_run(workdir: Path, pin_dir: Path) -> None:
    """No `kmeshd load` before: exit 69 with the command that fixes it."""
    d = DaemonProcess(workdir, INVENTORY, pin_dir)
    for path in (d.textfile.parent, d.accesslog.parent):
        path.chmod(0o777)
    run = subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-m", "kmeshd.cli", "run", "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )
    assert run.returncode == 69, run.stderr
    assert "run kmeshd load as root first" in run.stderr
