"""Real consumers of what the real daemon publishes: promtool and prometheus-node-exporter."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmeshd.accesslog.render import MESSAGE_ID
from tests.daemon_proc import DaemonProcess, free_port, parse_metrics, value
from tests.e2e import CLIENT, INVENTORY, SERVER, SERVICE, W, closed, exchange, wait_records
from tests.journald import Journald
from tests.netns import Pod, is_root

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.consumers,
    pytest.mark.skipif(not is_root(), reason="real eBPF needs root"),
]


@pytest.fixture
def traffic_seen(daemon: DaemonProcess, pods: dict[str, Pod]) -> DaemonProcess:
    exchange(pods, [(292, 5, 0)])
    daemon.wait_for(closed(1), what="one closed connection")
    time.sleep(0.5)  # let a publish write the textfile with it
    return daemon


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: apt-get install prometheus"
    return subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )


def test_promtool_accepts_http_metrics(traffic_seen: DaemonProcess) -> None:
    """`promtool check metrics` passes on a real /metrics scrape, lint included."""
    result = promtool_check(traffic_seen.scrape())
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_promtool_accepts_textfile(traffic_seen: DaemonProcess) -> None:
    """`promtool check metrics` passes on the textfile, which holds only kmesh_/kmeshd_ families."""
    text = traffic_seen.textfile.read_text()
    result = promtool_check(text)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert families and all(f.startswith(("kmesh_", "kmeshd_")) for f in families)


@pytest.fixture
def node_exporter(traffic_seen: DaemonProcess) -> Iterator[tuple[str, Path]]:
    binary = shutil.which("prometheus-node-exporter")
    assert binary, "apt-get install prometheus-node-exporter"
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={traffic_seen.textfile.parent}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        yield wait_http(url), traffic_seen.textfile
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wait_http(url: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_node_exporter_serves_the_textfile_families(node_exporter: tuple[str, Path]) -> None:
    """A real node-exporter textfile collector serves our families with no scrape error."""
    text, textfile = node_exporter
    s = parse_metrics(text)
    assert value(s, "node_textfile_scrape_error") == 0
    assert value(s, W + "received_bytes_total", reporter="source") == 292
    assert value(s, W + "sent_bytes_total", reporter="destination") == 5
    assert value(s, "kmesh_tcp_connections_opened_total", reporter="destination") == 1
    assert value(s, "kmeshd_build_info") == 1
    read = {dict(labels)["file"] for name, labels in s if name == "node_textfile_mtime_seconds"}
    assert read == {str(textfile)}


def test_journald_receives_the_daemons_records(
    journald: Journald, tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """journalctl -t kmeshd KMESHD_DST_WORKLOAD=<pod> -o json returns the daemon's records."""
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, journald=True)
    # In journald's mount namespace /run/systemd/journal/socket is that journald's socket,
    # so the daemon finds it at the default path, as on a real host.
    daemon.start(wrapper=["nsenter", f"--target={journald.pid}", "--mount", f"--wd={Path.cwd()}"])
    try:
        exchange(pods, [(292, 5, 0)])
        wait_records(daemon, 2)
        entries = journald.query("-t", "kmeshd", f"KMESHD_DST_WORKLOAD={SERVER}")
        s = daemon.samples()
    finally:
        daemon.close()
    assert sorted(e["KMESHD_DIRECTION"] for e in entries) == ["INBOUND", "OUTBOUND"]
    for e in entries:
        assert e["SYSLOG_IDENTIFIER"] == "kmeshd" and e["MESSAGE_ID"] == MESSAGE_ID
        assert (e["KMESHD_SENT_BYTES"], e["KMESHD_RECEIVED_BYTES"]) == ("5", "292")
        assert (e["KMESHD_SRC_WORKLOAD"], e["KMESHD_DST_SERVICE"]) == (CLIENT, SERVICE)
        assert e["MESSAGE"].startswith(f"src.addr={pods['client'].ip4}:")
        assert e["MESSAGE"].endswith(
            f"dst.addr=10.244.77.3:80, dst.service={SERVICE}, dst.workload={SERVER}, "
            f"dst.namespace=default, direction={e['KMESHD_DIRECTION']}, sent_bytes=5, "
            f"received_bytes=292, duration={e['KMESHD_DURATION']}"
        )
    assert value(s, "kmeshd_sink_up", sink="journald") == 1
    assert value(s, "kmeshd_accesslog_records_dropped_total", sink="journald") == 0
