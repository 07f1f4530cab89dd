"""One publish, on a fake probe: the kernel's flows under today's identities in /metrics
and the textfile, the daemon's health beside them, old generations retired exactly, and
a scrape that never waits."""

from __future__ import annotations

import gzip
import logging
import os
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kmeshd.accesslog.records import RecordFeed
from kmeshd.accesslog.sinks import Fanout
from kmeshd.aggregate import Ledger
from kmeshd.export.http import MetricsServer
from kmeshd.export.textfile import Textfile
from kmeshd.identity.model import Identities, Workload
from kmeshd.identity.sources import StaticSource
from kmeshd.kernel.layout import Direction, Stat
from kmeshd.known import KnownAddresses
from kmeshd.publish import Publisher
from tests.fakes import FakeClock, FakeProbe, flow_key, flow_value, ip

CLIENT = Workload(
    "sleep-1", "sleep", "default", "sleep", "latest", "-", "Kubernetes", (ip("10.0.0.1"),)
)
SERVER = Workload("web-1", "web", "default", "web", "v1", "-", "Kubernetes", (ip("10.0.0.2"),))
IDS = Identities((CLIENT, SERVER))
OUT = flow_key("10.0.0.1", "10.0.0.2", 80, Direction.OUTBOUND)
IN = flow_key("10.0.0.1", "10.0.0.2", 80, Direction.INBOUND)


def publisher(
    probe: FakeProbe,
    clock: FakeClock,
    textfile: Path | None = None,
    server: MetricsServer | None = None,
    flow_expiry: float = 120.0,
) -> Publisher:
    feed = RecordFeed(Fanout(), IDS, 0, clock.monotonic)
    known = KnownAddresses(probe, clock.monotonic)
    tf = Textfile(textfile, clock.monotonic) if textfile else None
    return Publisher(probe, Ledger(), server, tf, feed, known, clock, flow_expiry)


def scraped(pub: Publisher) -> str:
    """What the last publish hands to /metrics."""
    return gzip.decompress(pub.body.gzip).decode()


def values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def one(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of `name` whose labels include `labels`."""
    found = [v for (n, ls), v in values(text).items() if n == name and labels.items() <= ls]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_a_publish_folds_flows_under_the_identities_known_now(tmp_path: Path) -> None:
    """Both reporters of one 292/5-byte connection land in their label sets, exactly, in
    /metrics' families and in the textfile alike; the open one counts as active."""
    probe, clock = FakeProbe(), FakeClock()
    probe.flows_map = {OUT: flow_value(1, 1, 292, 5), IN: flow_value(2, 1, 292, 5)}
    probe.open_now = {IN: 1}
    pub = publisher(probe, clock, tmp_path / "kmeshd.prom")
    pub.publish(IDS, {"inventory": True})
    text = (tmp_path / "kmeshd.prom").read_text()
    assert scraped(pub) == text
    src = dict(source_workload="sleep", destination_workload="web")
    for reporter, opened, active in (("source", 1, 0), ("destination", 2, 1)):
        labels = dict(src, reporter=reporter)
        assert one(text, "kmesh_tcp_workload_connections_opened_total", **labels) == opened
        assert one(text, "kmesh_tcp_workload_received_bytes_total", **labels) == 292
        assert one(text, "kmesh_tcp_workload_sent_bytes_total", **labels) == 5
        assert one(text, "kmesh_tcp_workload_connections_active", **labels) == active
    assert probe.sweeps == 1
    assert one(text, "kmeshd_last_publish_timestamp_seconds") == clock.time()
    assert one(text, "kmeshd_identity_source_up", source="inventory") == 1
    assert one(text, "kmeshd_series", level="workload") == 2
    assert one(text, "kmeshd_bpf_map_entries", map="flows") == 2


def test_sockets_the_sweep_could_not_read_are_exported_and_said_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The probe's unreached sockets (after its open_connections) are a gauge, its busy
    visits a counter; a publish with any says so, at most once a minute."""
    probe, clock = FakeProbe(), FakeClock()
    probe.unreached = 3
    probe.stats_values[Stat.SWEEP_BUSY] = 7
    pub = publisher(probe, clock)
    with caplog.at_level(logging.INFO, logger="kmeshd.publish"):
        for _ in range(3):
            pub.publish(IDS, {"inventory": True})
            clock.sleep(5)
    text = scraped(pub)
    assert one(text, "kmeshd_sweep_sockets_unreached") == 3
    assert one(text, "kmeshd_sweep_sockets_busy_total") == 7
    said = [r.getMessage() for r in caplog.records if "socket sweep" in r.getMessage()]
    assert said == [
        "socket sweep: 3 open connections not read (no process holds a file of them: an"
        " accept queue, io_uring, the kernel; or in use at each try); their bytes come at a"
        " later sweep or at close (kmeshd_sweep_sockets_unreached)"
    ]
    probe.unreached = 0
    clock.sleep(60)
    pub.publish(IDS, {"inventory": True})
    assert one(scraped(pub), "kmeshd_sweep_sockets_unreached") == 0


def test_counters_grow_by_what_changed_and_unseen_closes_count_as_closed() -> None:
    """The next publish adds only the kernel's growth; closes the closed-socket sweep found
    count as closed, not opened, once."""
    probe, clock = FakeProbe(), FakeClock()
    probe.flows_map = {OUT: flow_value(1, 0, 100, 0)}
    pub = publisher(probe, clock)
    pub.publish(IDS, {})
    probe.flows_map = {OUT: flow_value(3, 1, 350, 7)}
    probe.unseen = [(OUT, 1)]
    pub.publish(IDS, {})
    pub.publish(IDS, {})
    text = scraped(pub)
    labels = dict(reporter="source", source_workload="sleep")
    assert one(text, "kmesh_tcp_workload_connections_opened_total", **labels) == 3
    assert one(text, "kmesh_tcp_workload_connections_closed_total", **labels) == 2
    assert one(text, "kmesh_tcp_workload_received_bytes_total", **labels) == 350
    assert one(text, "kmeshd_connections_closed_unobserved_total") == 1


def test_an_old_generation_is_read_a_last_time_then_forgotten() -> None:
    """Once flow_expiry has passed, a publish starts a new generation, folds the old one's
    final counts and deletes its entries; what the new one counts adds to them."""
    probe, clock = FakeProbe(), FakeClock()
    pub = publisher(probe, clock, flow_expiry=60.0)
    probe.flows_map = {OUT: flow_value(1, 0, 100, 0)}
    pub.publish(IDS, {})
    clock.sleep(30.0)
    probe.flows_map[OUT] = flow_value(1, 1, 150, 0)  # still generation 0: no switch yet
    pub.publish(IDS, {})
    assert probe.generations == 0
    clock.sleep(30.0)
    probe.flows_map[OUT] = flow_value(1, 1, 170, 0)  # written before the switch
    pub.publish(IDS, {})
    assert (probe.generations, probe.generation, probe.flows_map) == (1, 1, {})
    assert pub.ledger.entries == 0
    new = flow_key("10.0.0.1", "10.0.0.2", 80, Direction.OUTBOUND, generation=1)
    probe.flows_map = {new: flow_value(2, 1, 40, 3)}
    pub.publish(IDS, {})
    text = scraped(pub)
    labels = dict(reporter="source", source_workload="sleep")
    assert one(text, "kmesh_tcp_workload_connections_opened_total", **labels) == 3
    assert one(text, "kmesh_tcp_workload_connections_closed_total", **labels) == 2
    assert one(text, "kmesh_tcp_workload_received_bytes_total", **labels) == 210
    assert one(text, "kmesh_tcp_workload_sent_bytes_total", **labels) == 3


def test_health_carries_the_probe_stats_and_the_feeds_counts() -> None:
    """kmeshd_ families say what the kernel could not record, by map."""
    probe, clock = FakeProbe(), FakeClock()
    probe.stats_values |= {Stat.FLOWS_FULL: 7, Stat.RINGBUF_LOST: 3, Stat.OPENED: 11}
    probe.known_capacity = 1
    pub = publisher(probe, clock)
    pub._known.update(StaticSource(IDS), force=True)  # two addresses, room for one
    pub.publish(IDS, {})
    text = scraped(pub)
    assert one(text, "kmeshd_bpf_map_full_total", map="flows") == 7
    assert one(text, "kmeshd_bpf_map_full_total", map="known_addrs") == 1
    assert one(text, "kmeshd_bpf_map_capacity", map="flows") == 65536
    assert one(text, "kmeshd_events_lost_total") == 3
    assert one(text, "kmeshd_events_total", kind="opened") == 11


def test_a_scrape_is_answered_from_the_last_snapshot_while_a_publish_is_stuck() -> None:
    """/metrics never waits on the daemon's own work: while a publish hangs, a scrape is
    answered at once from the previous snapshot; the publish's values come after it."""
    probe, clock = FakeProbe(), FakeClock()
    probe.stuck = threading.Event()
    server = MetricsServer("127.0.0.1", 0)
    pub = publisher(probe, clock, server=server)
    url = f"http://127.0.0.1:{server.port}/metrics"
    publish = threading.Thread(target=pub.publish, args=(IDS, {}))
    try:
        publish.start()
        assert probe.in_sweep.wait(10)
        with urllib.request.urlopen(url, timeout=2) as r:
            before = r.read().decode()
        assert "kmeshd_last_publish_timestamp_seconds" not in before  # nothing published yet
        probe.stuck.set()
        publish.join(10)
        with urllib.request.urlopen(url, timeout=2) as r:
            after = r.read().decode()
        assert "kmeshd_last_publish_timestamp_seconds" in after
    finally:
        probe.stuck.set()
        publish.join(10)
        server.close()


def test_a_textfile_that_cannot_be_written_is_counted_and_the_old_one_kept(
    tmp_path: Path,
) -> None:
    """A failed write keeps the previous file, counts, and shows the sink down until a
    write works again."""
    probe, clock = FakeProbe(), FakeClock()
    path = tmp_path / "kmeshd.prom"
    pub = publisher(probe, clock, path)
    pub.publish(IDS, {})
    first = path.read_text()
    blocker = tmp_path / f".kmeshd.prom.{os.getpid()}.tmp"
    blocker.mkdir()  # the temp file cannot be made: every write fails
    pub.publish(IDS, {})
    pub.publish(IDS, {})
    assert path.read_text() == first
    assert one(scraped(pub), "kmeshd_sink_up", sink="textfile") == 0
    blocker.rmdir()
    pub.publish(IDS, {})
    text = path.read_text()
    assert one(text, "kmeshd_textfile_write_failures_total") == 2
    pub.publish(IDS, {})
    assert one(path.read_text(), "kmeshd_sink_up", sink="textfile") == 1


def test_the_series_of_a_deleted_pod_leave_after_its_grace_and_series_ttl() -> None:
    """Kubernetes: a pod deleted by the apiserver still names its series during the cache's
    grace period; once gone from the cache and idle for series_ttl, its label sets leave
    /metrics, and the other pod's stay with their counts."""
    from kmeshd.identity.cache import APISERVER, PODS, IdentityCache
    from kmeshd.identity.objects import Pod

    cache = IdentityCache("n1", grace=30.0)
    other = Workload(
        "sleep-2", "sleep2", "default", "sleep2", "latest", "-", "Kubernetes", (ip("10.0.0.3"),)
    )
    for w in (CLIENT, SERVER, other):
        cache.put(PODS, APISERVER, Pod(w.name, "n1", 1.0, False, False, w), now=0)
    probe, clock = FakeProbe(), FakeClock()
    pub = publisher(probe, clock)
    pub.ledger.series_ttl = 60.0
    probe.flows_map = {
        OUT: flow_value(1, 1, 10, 5),
        flow_key("10.0.0.3", "10.0.0.2", 80, Direction.OUTBOUND): flow_value(1, 1, 10, 5),
    }
    pub.publish(cache, {})
    assert one(scraped(pub), "kmeshd_series", level="workload") == 2
    cache.delete(PODS, APISERVER, CLIENT.name, now=clock.monotonic())
    for _ in range(9):  # 90 s: past the grace (30 s) and the series_ttl (60 s) after it
        clock.sleep(10.0)
        cache.gc(clock.monotonic())
        pub.publish(cache, {})
    text = scraped(pub)
    assert 'source_workload="sleep"' not in text
    assert one(text, "kmesh_tcp_workload_received_bytes_total", source_workload="sleep2") == 10
    assert one(text, "kmeshd_series_expired_total") == 2


def test_the_sources_rejected_objects_are_exported_as_counted() -> None:
    probe, clock = FakeProbe(), FakeClock()
    pub = publisher(probe, clock)
    pub.publish(IDS, {"apiserver": True}, {("apiserver", "pods"): 2, ("kubelet", "pods"): 0})
    text = scraped(pub)
    name = "kmeshd_identity_objects_rejected_total"
    assert one(text, name, source="apiserver", resource="pods") == 2
    assert one(text, name, source="kubelet", resource="pods") == 0
