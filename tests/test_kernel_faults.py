"""The daemon under faults, end to end (root, real eBPF, pods in network namespaces): the
access log's disk full, the textfile directory read-only, journald stopped and started,
a crowd of scrapes and a client that never sends its request. Through each, the daemon
keeps running, says what is wrong (a metric and a log line), the counters stay exact, and
it recovers by itself when the fault goes."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from kmeshd.accesslog.sinks import RECONNECT_EVERY_S
from tests.daemon_proc import DaemonProcess, Samples, parse_metrics, value
from tests.e2e import INVENTORY, W, exchange
from tests.journald import running_journald
from tests.netns import Pod, is_root

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root: eBPF, mounts, namespaces")


def mount_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True)  # fmt: skip


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def exact(s: Samples, n: int) -> bool:
    """n connections of 100 bytes out and 10 back, for both reporters, and no more."""
    return all(
        value(s, W + "connections_opened_total", reporter=r) == n
        and value(s, W + "connections_closed_total", reporter=r) == n
        and value(s, W + "received_bytes_total", reporter=r) == 100 * n
        and value(s, W + "sent_bytes_total", reporter=r) == 10 * n
        for r in ("source", "destination")
    )


def records_in(path: Path) -> tuple[int, int]:
    """(whole JSON lines, lines that are not): a full disk may cut one line short."""
    whole = torn = 0
    for line in path.read_bytes().splitlines():
        try:
            json.loads(line)
            whole += 1
        except ValueError:
            torn += 1
    return whole, torn


def test_a_full_disk_and_a_read_only_textfile_cost_records_and_writes_not_counts(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir)
    with ExitStack() as undo:
        for where, size in ((daemon.accesslog.parent, "16k"), (daemon.textfile.parent, "4m")):
            mount_tmpfs(where, size)
            undo.callback(subprocess.run, ["umount", "--lazy", str(where)], check=False)
        daemon.start()
        undo.callback(daemon.close)

        # The access log's disk fills: records are dropped and counted, nothing else moves.
        exchange(pods, [(100, 10, 0)] * 40)  # 80 records, ~40 KB of JSON lines
        s = daemon.wait_for(lambda s: exact(s, 40), what="40 exact")
        s = daemon.wait_for(
            lambda s: value(s, "kmeshd_accesslog_records_total") == 80, what="80 records"
        )
        dropped = value(s, "kmeshd_accesslog_records_dropped_total", sink="file")
        whole, torn = records_in(daemon.accesslog)
        assert dropped > 0 and whole + dropped == 80 and torn <= 1
        assert value(s, "kmeshd_sink_up", sink="file") == 0
        assert "No space left on device" in daemon.stderr()

        # Room again: the sink is back with the next record, the earlier lines intact.
        remount(daemon.accesslog.parent, "size=4m")
        exchange(pods, [(100, 10, 0)] * 2)
        s = daemon.wait_for(lambda s: exact(s, 42), what="42 exact")
        s = daemon.wait_for(
            lambda s: value(s, "kmeshd_accesslog_records_total") == 84, what="84 records"
        )
        assert value(s, "kmeshd_sink_up", sink="file") == 1
        assert value(s, "kmeshd_accesslog_records_dropped_total", sink="file") == dropped
        assert records_in(daemon.accesslog)[0] == whole + 4

        # The textfile's directory read-only: writes fail, counted; the last one stays.
        remount(daemon.textfile.parent, "ro")
        before = daemon.textfile.read_text()
        exchange(pods, [(100, 10, 0)] * 3)
        s = daemon.wait_for(
            lambda s: exact(s, 45) and value(s, "kmeshd_textfile_write_failures_total") >= 2,
            what="45 exact and failed textfile writes",
        )
        assert value(s, "kmeshd_sink_up", sink="textfile") == 0
        assert daemon.textfile.read_text() == before
        assert "Read-only file system" in daemon.stderr()
        remount(daemon.textfile.parent, "rw")
        daemon.wait_for(lambda s: value(s, "kmeshd_sink_up", sink="textfile") == 1, what="up")
        assert exact(parse_metrics(daemon.textfile.read_text()), 45)

        # 50 scrapes at once, while a client holds a connection without a request.
        silent = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
        undo.callback(silent.close)
        answers: list[Samples] = []

        def scrape() -> None:
            url = f"http://127.0.0.1:{daemon.port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                answers.append(parse_metrics(r.read().decode()))

        scrapers = [threading.Thread(target=scrape) for _ in range(50)]
        for t in scrapers:
            t.start()
        for t in scrapers:
            t.join(30)
        assert len(answers) == 50 and all(exact(a, 45) for a in answers)
        assert value(answers[-1], "kmeshd_http_connections_refused_total") == 0
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert daemon.stop() == 0


def test_journald_stopped_and_started_again_costs_the_records_between_only(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    root = tmp_path / "j"  # short: the socket's path must fit in 108 bytes
    root.mkdir()
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, journald=True)
    with ExitStack() as undo:
        first = ExitStack()
        undo.enter_context(first)
        journald = first.enter_context(running_journald(root))
        # In journald's mount namespace /run is root/run: the daemon finds the socket at the
        # default path, and a journald started again on the same root appears there too.
        daemon.start(
            wrapper=["nsenter", f"--target={journald.pid}", "--mount", f"--wd={Path.cwd()}"]
        )
        undo.callback(daemon.close)
        exchange(pods, [(100, 10, 0)])
        daemon.wait_for(lambda s: exact(s, 1), what="1 exact")
        assert len(journald.query("-t", "kmeshd")) == 2

        first.close()  # journald stops: two connections' records have nowhere to go
        exchange(pods, [(100, 10, 0)] * 2)
        s = daemon.wait_for(
            lambda s: exact(s, 3) and value(s, "kmeshd_accesslog_records_total") == 6,
            what="3 exact, 6 records",
        )
        assert value(s, "kmeshd_sink_up", sink="journald") == 0
        assert value(s, "kmeshd_accesslog_records_dropped_total", sink="journald") == 4
        assert "journald" in daemon.stderr()

        again = undo.enter_context(running_journald(root))
        time.sleep(RECONNECT_EVERY_S + 0.5)  # the sink looks for the socket this often
        exchange(pods, [(100, 10, 0)])
        s = daemon.wait_for(lambda s: exact(s, 4), what="4 exact")
        s = daemon.wait_for(
            lambda s: value(s, "kmeshd_sink_up", sink="journald") == 1, what="journald up"
        )
        assert value(s, "kmeshd_accesslog_records_dropped_total", sink="journald") == 4
        entries = again.query("-t", "kmeshd")  # both journalds' files: 2 before, 2 after
        assert [e["KMESHD_RECEIVED_BYTES"] for e in entries] == ["100"] * 4
        assert "journald reachable again" in daemon.stderr()
        assert daemon.stop() == 0
