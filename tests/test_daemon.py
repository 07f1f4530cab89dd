"""The daemon's lifecycle without root: startup, the main loop's ticks and publishes, a
reload (good and bad), a publish stuck in the kernel, and shutdown, on a fake probe and a
fake clock, with a real sd_notify socket, real files and a real /metrics listener."""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmeshd.config import Config, load_config
from kmeshd.daemon import Daemon
from kmeshd.errors import ConfigError
from kmeshd.identity.sources import open_source
from kmeshd.kernel.layout import Direction
from tests.daemon_proc import free_port, parse_metrics, value
from tests.fakes import FakeClock, FakeKernel, conn_record, flow_key, flow_value

INVENTORY = """
[[workload]]
name = "sleep-1"
workload = "sleep"
addresses = ["10.0.0.1"]
[[workload]]
name = "web-1"
workload = "web"
addresses = ["10.0.0.2"]
"""


class Notifications:
    """sd_notify messages as systemd would receive them, on a real datagram socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.seen: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.seen.append(self._sock.recv(4096).decode())
            except BlockingIOError:
                return self.seen


@pytest.fixture
def notifications(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Notifications]:
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        yield Notifications(sock)


class Host:
    """A config on disk, and what a daemon on it would run on."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.port = free_port()
        self.inventory = tmp_path / "inventory.toml"
        self.inventory.write_text(INVENTORY)
        self.accesslog = tmp_path / "log" / "accesslog.json"
        self.textfile = tmp_path / "textfile" / "kmeshd.prom"
        self.state_file = tmp_path / "counters.json.gz"
        self.accesslog.parent.mkdir()
        self.textfile.parent.mkdir()
        self.config_path = tmp_path / "kmeshd.toml"
        self.write_config()
        self.kernel = FakeKernel(tmp_path / "cgroup")
        self.clock = FakeClock()

    def write_config(self, extra: str = "", interval: str = "1s") -> None:
        self.config_path.write_text(
            f'[identity]\ninventory = "{self.inventory}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.port}"\ntextfile = "{self.textfile}"\n'
            f'interval = "{interval}"\nstate_file = "{self.state_file}"\n'
            f'[accesslog]\nfile = "{self.accesslog}"\njournald = false\n{extra}'
        )

    def config(self) -> Config:
        return load_config(self.config_path)

    def daemon(self) -> Daemon:
        return Daemon(self.config(), self.kernel, open_source, clock=self.clock)

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def records(self, path: Path | None = None) -> list[dict[str, object]]:
        """The JSON lines of the access log (or of the file at `path`)."""
        lines = (path or self.accesslog).read_text().splitlines()
        return [json.loads(line) for line in lines]


def last_publish(text: str) -> float:
    """kmeshd_last_publish_timestamp_seconds in a scrape."""
    return value(parse_metrics(text), "kmeshd_last_publish_timestamp_seconds")


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


OUT = flow_key("10.0.0.1", "10.0.0.2", 80, Direction.OUTBOUND)
RECORD = conn_record("10.0.0.1", 40000, "10.0.0.2", 80, Direction.OUTBOUND, received_bytes=292)


def test_startup_attaches_publishes_and_says_ready(
    host: Host, notifications: Notifications
) -> None:
    """Start-up reports each phase, hands the kernel the inventory's addresses, tunes the
    probe as the config asks, publishes once and only then sends READY=1."""
    host.kernel.probe.flows_map = {OUT: flow_value(1, 0, 292, 0)}
    daemon = host.daemon()
    daemon.startup()
    try:
        assert notifications.read() == [
            "STATUS=loading identities",
            f"STATUS=listening on 127.0.0.1:{host.port}",
            "EXTEND_TIMEOUT_USEC=30000000",
            "STATUS=compiling the BPF probe",
            "STATUS=waiting for the identity sources",
            f"READY=1\nSTATUS=probe attached to {host.dir / 'cgroup'}; /metrics on"
            f" 127.0.0.1:{host.port}; identities from the inventory",
        ]
        probe = host.kernel.probe
        assert len(probe.known) == 2
        assert probe.settings == {"records": True, "live_updates": True, "periodic": 0.0}
        assert probe.sweeps == 1
        text = host.scrape()
        assert 'source_workload="sleep"' in text and "process_cpu_seconds_total" in text
        assert last_publish(text) == host.clock.time()
        assert host.textfile.read_text().count("kmesh_tcp_workload_received_bytes_total{") == 1
    finally:
        daemon.shutdown()


def test_the_main_loop_drains_records_and_publishes_every_interval(host: Host) -> None:
    """Each tick hands queued records to the access log, stamped with the wall clock; a
    publish comes every metrics.interval of the clock, and a stop ends the loop."""
    daemon = host.daemon()
    daemon.startup()
    probe, clock = host.kernel.probe, host.clock
    started = clock.monotonic()
    probe.records = [RECORD, RECORD]

    def tick() -> None:
        if clock.monotonic() - started >= 3.05:
            daemon.stop()

    clock.on_sleep = tick
    daemon.run()
    daemon.shutdown()
    assert probe.sweeps == 1 + 3 + 1  # start-up, three intervals, shutdown
    records = host.records()
    assert [(r["src.workload"], r["dst.workload"], r["received_bytes"]) for r in records] == [
        ("sleep-1", "web-1", 292)
    ] * 2
    assert records[0]["time"] == "2023-11-14T22:13:20.000000000Z"  # record time 0 + offset


def test_a_reload_applies_the_new_config(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    """SIGHUP's reload re-reads the inventory, switches the access log to the new file,
    retunes the probe, and names what waits for a restart; READY=1 follows."""
    daemon = host.daemon()
    daemon.startup()
    host.inventory.write_text(INVENTORY.replace('"web-1"', '"web-2"'))
    moved = host.dir / "log" / "moved.json"
    host.config_path.write_text(
        host.config_path.read_text().replace(str(host.accesslog), str(moved))
        + 'periodic = "30s"\n[bpf]\ncgroup = "/sys/fs/cgroup/other"\n'
    )
    with caplog.at_level(logging.INFO, logger="kmeshd"):
        daemon.reload()
    host.kernel.probe.records = [RECORD]
    host.kernel.probe.drain()
    daemon.shutdown()
    assert [r["dst.workload"] for r in host.records(moved)] == ["web-2"]
    assert host.kernel.probe.settings["periodic"] == 30.0
    assert "bpf.cgroup changed: takes effect after a restart" in caplog.text
    assert daemon.config.accesslog.periodic == 30.0


def test_a_rejected_reload_keeps_everything_running(
    host: Host, notifications: Notifications, caplog: pytest.LogCaptureFixture
) -> None:
    """A config with a problem changes nothing: the running config, identities and sinks
    stay, the problem is logged, and STATUS= says the reload was rejected."""
    daemon = host.daemon()
    daemon.startup()
    running = daemon.config
    host.config_path.write_text(host.config_path.read_text() + "max_rate = -1\n")
    with caplog.at_level(logging.ERROR, logger="kmeshd"):
        daemon.reload()
    host.kernel.probe.records = [RECORD]
    host.kernel.probe.drain()
    daemon.shutdown()
    assert daemon.config is running
    assert [r["dst.workload"] for r in host.records()] == ["web-1"]
    assert "reload rejected, keeping the running config" in caplog.text
    assert "accesslog.max_rate: must be 0 (no limit)" in caplog.text
    reloading, ready, _stopping = notifications.read()[-3:]
    assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert ready == (
        "READY=1\nSTATUS=running; identities from the inventory;"
        " reload rejected: running the previous config"
    )


def test_scrapes_are_answered_while_a_publish_is_stuck(host: Host) -> None:
    """A publish hung in the kernel holds the main loop, not /metrics: scrapes get the
    last snapshot at once, and the stuck publish's values once it ends."""
    daemon = host.daemon()
    daemon.startup()
    probe, clock = host.kernel.probe, host.clock
    first = clock.time()
    probe.stuck = threading.Event()
    probe.in_sweep.clear()
    clock.on_sleep = lambda: daemon.stop() if probe.sweeps >= 2 else None
    loop = threading.Thread(target=daemon.run)
    loop.start()
    try:
        assert probe.in_sweep.wait(10)
        assert last_publish(host.scrape()) == first
        probe.stuck.set()
        loop.join(10)
        assert last_publish(host.scrape()) > first
    finally:
        probe.stuck.set()
        loop.join(10)
        daemon.shutdown()


def test_shutdown_drains_publishes_and_detaches(host: Host, notifications: Notifications) -> None:
    """Shutdown writes every queued record past the rate budget, publishes a last time,
    detaches the probe and closes the listener."""
    host.write_config(extra="max_rate = 1\n")
    daemon = host.daemon()
    daemon.startup()
    probe = host.kernel.probe
    probe.records = [RECORD] * 5
    daemon.shutdown()
    assert len(host.records()) == 5
    assert probe.sweeps == 2 and probe.closed is True
    assert notifications.read()[-1] == "STOPPING=1"
    with pytest.raises(urllib.error.URLError):
        host.scrape()


def test_a_stop_during_startup_ends_it_before_ready(
    host: Host, notifications: Notifications
) -> None:
    """A stop signal while bcc compiles: no wait for identities, no READY=1; shutdown
    still detaches what was attached."""
    daemon = host.daemon()
    host.kernel.on_start = daemon.stop
    daemon.startup()
    daemon.shutdown()
    assert not any(m.startswith("READY=1") for m in notifications.read())
    assert host.kernel.probe.closed is True


def test_a_bad_path_at_startup_is_a_config_error_before_the_kernel(host: Host) -> None:
    """An explicit textfile whose directory is missing stops start-up with the key named,
    before any probe is made."""
    host.config_path.write_text(
        host.config_path.read_text().replace(str(host.textfile), "/nonexistent/dir/k.prom")
    )
    daemon = host.daemon()
    with pytest.raises(ConfigError, match=r"metrics\.textfile: directory /nonexistent/dir"):
        daemon.startup()
    daemon.shutdown()
    assert host.kernel.probe.callback is None


def test_a_failing_publish_and_drain_are_logged_counted_and_survived(
    host: Host, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish that raises costs that publish: logged once with its traceback, counted in
    kmeshd_publish_errors_total, and the next interval's publish runs. A drain that raises
    is counted under its step; a garbage record costs itself only."""
    daemon = host.daemon()
    daemon.startup()
    probe, clock = host.kernel.probe, host.clock
    assert daemon.publisher is not None
    real_publish = daemon.publisher.publish
    failures = iter([RuntimeError("disk on fire"), RuntimeError("disk on fire")])

    def publish(*args: object) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        real_publish(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon.publisher, "publish", publish)
    real_drain = probe.drain
    drains = iter([OSError(5, "Input/output error")])

    def drain() -> None:
        error = next(drains, None)
        if error is not None:
            raise error
        real_drain()

    monkeypatch.setattr(probe, "drain", drain)
    probe.records = [b"\x01" * 7, RECORD]  # a record too short to be one, then a good one
    started = clock.monotonic()
    clock.on_sleep = lambda: daemon.stop() if clock.monotonic() - started >= 3.05 else None
    with caplog.at_level(logging.ERROR, logger="kmeshd"):
        daemon.run()
    s = parse_metrics(host.scrape())
    daemon.shutdown()
    assert value(s, "kmeshd_publish_errors_total") == 2
    assert value(s, "kmeshd_loop_errors_total", step="drain") == 1
    assert value(s, "kmeshd_loop_errors_total", step="identities") == 0
    assert value(s, "kmeshd_accesslog_records_failed_total") == 1
    assert value(s, "kmeshd_accesslog_records_total") == 2
    assert [r["received_bytes"] for r in host.records()] == [292]
    published = [r for r in caplog.records if r.getMessage().startswith("publish failed")]
    assert len(published) == 1  # the second within the minute: counted, not logged
    assert published[0].exc_info is not None
    assert published[0].getMessage() == (
        "publish failed: RuntimeError('disk on fire'); carrying on (1 failures of it so far)"
    )
    assert "drain failed: OSError(5, 'Input/output error')" in caplog.text
    assert "a kernel record (7 bytes) makes no access-log record" in caplog.text


def test_a_reload_that_raises_still_says_ready_and_is_counted(
    host: Host, notifications: Notifications, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected failure inside a reload must not leave systemd in "reloading": READY=1
    follows with a status that says so, and the loop goes on."""
    daemon = host.daemon()
    daemon.startup()

    def broken(*_args: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr("kmeshd.daemon.prepare", broken)
    daemon._reload = True
    host.clock.on_sleep = daemon.stop
    daemon.run()
    daemon.publish()
    s = parse_metrics(host.scrape())
    daemon.shutdown()
    assert value(s, "kmeshd_loop_errors_total", step="reload") == 1
    reloading, ready = notifications.read()[-3:-1]
    assert reloading.startswith("RELOADING=1")
    assert ready == (
        "READY=1\nSTATUS=running; identities from the inventory;"
        " reload failed: running the previous config"
    )


def test_the_publish_interval_is_exported_and_follows_a_reload(host: Host) -> None:
    """kmeshd_publish_interval_seconds is metrics.interval, as the KmeshdNotPublishing
    alert needs it, and a reload's new interval replaces it."""
    daemon = host.daemon()
    daemon.startup()
    daemon.publish()
    before = value(parse_metrics(host.scrape()), "kmeshd_publish_interval_seconds")
    host.write_config(interval="2.5s")
    daemon.reload()
    daemon.publish()
    after = value(parse_metrics(host.scrape()), "kmeshd_publish_interval_seconds")
    daemon.shutdown()
    assert (before, after) == (1.0, 2.5)
