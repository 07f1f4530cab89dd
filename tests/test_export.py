"""The exposition (the kmesh_* families as text, the kmeshd_* health beside them) and the
/metrics listener that serves it."""

from __future__ import annotations

import errno
import gzip
import socket
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kmeshd.aggregate import LabelSet, Ledger, Slots
from kmeshd.config import HISTOGRAMS
from kmeshd.export.exposition import Exposition
from kmeshd.export.http import Body, MetricsServer
from kmeshd.export.metrics import Health, SinkHealth, health_text
from kmeshd.labels import SERVICE_LABELS, WORKLOAD_LABELS, LabelValues
from tests.flow_counters import FlowCounters

WL = (
    "destination",
    "sleep",
    "sleep",
    "latest",
    "default",
    "-",
    "sleep",
    "latest",
    "Kubernetes",
    "10.244.0.11",
    "default",
    "httpbin-5c5944c58c-v9mlk",
    "httpbin",
    "httpbin",
    "v1",
    "default",
    "-",
    "httpbin",
    "v1",
    "Kubernetes",
    "tcp",
    "-",
    "unknown",
)
SVC = (*WL[:9], "httpbin.default.svc.cluster.local", "default", "httpbin", *WL[12:])


@dataclass
class Snapshot:
    """What a publish renders: label sets of both levels (their counts as FlowCounters),
    the connections open in each, and the daemon's health."""

    workload: Mapping[LabelValues, FlowCounters] = field(default_factory=dict)
    service: Mapping[LabelValues, FlowCounters] = field(default_factory=dict)
    health: Health = field(default_factory=Health)
    active_workload: Mapping[LabelValues, int] = field(default_factory=dict)
    active_service: Mapping[LabelValues, int] = field(default_factory=dict)
    histograms: tuple[str, ...] = HISTOGRAMS

    def ledger(self) -> Ledger:
        slots = Slots(self.histograms)
        ledger = Ledger(slots)
        levels = (
            ("workload", self.workload, self.active_workload),
            ("service", self.service, self.active_service),
        )
        for level, totals, active in levels:
            for labels, counts in totals.items():
                vector = counts.vector()
                kept = [vector[i] for i in slots.picks]
                ledger.levels[level][labels] = LabelSet(kept, 0.0, active.get(labels, 0))
        return ledger


def render(snapshot: Snapshot) -> str:
    ledger = snapshot.ledger()
    return "".join(Exposition(ledger.slots).render(ledger)) + health_text(snapshot.health)


def snapshot() -> Snapshot:
    health = Health(
        version="0.1.0",
        events={"opened": 2, "closed": 2, "failed": 1},
        events_lost=3,
        map_full={"flows": 0, "sockets": 0},
        unattributed=4,
        sinks=(
            SinkHealth("file", True, 0),
            SinkHealth("journald", False, 7),
            SinkHealth("textfile", False, None),
        ),
        textfile_failures=2,
        sources={"inventory": True},
        last_publish=1700000000.5,
        publish_seconds=0.01,
    )
    counts = FlowCounters(1, 1, 0, 292, 5)
    return Snapshot({WL: counts}, {SVC: counts}, health)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)], plus "TYPE:<family>" -> the family's type."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out[f"TYPE:{family.name}"] = [({"type": family.type}, 0.0)]
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.mark.parametrize(
    ("name", "labels", "values", "expected"),
    [
        ("kmesh_tcp_workload_received_bytes_total", WORKLOAD_LABELS, WL, 292.0),
        ("kmesh_tcp_workload_sent_bytes_total", WORKLOAD_LABELS, WL, 5.0),
        ("kmesh_tcp_workload_connections_opened_total", WORKLOAD_LABELS, WL, 1.0),
        ("kmesh_tcp_workload_connections_closed_total", WORKLOAD_LABELS, WL, 1.0),
        ("kmesh_tcp_workload_connections_failed_total", WORKLOAD_LABELS, WL, 0.0),
        ("kmesh_tcp_received_bytes_total", SERVICE_LABELS, SVC, 292.0),
        ("kmesh_tcp_sent_bytes_total", SERVICE_LABELS, SVC, 5.0),
        ("kmesh_tcp_connections_opened_total", SERVICE_LABELS, SVC, 1.0),
        ("kmesh_tcp_connections_closed_total", SERVICE_LABELS, SVC, 1.0),
        ("kmesh_tcp_connections_failed_total", SERVICE_LABELS, SVC, 0.0),
    ],
)
def test_ten_families_with_contract_labels(
    name: str, labels: tuple[str, ...], values: tuple[str, ...], expected: float
) -> None:
    """Each of the ten families is a counter with exactly the contract's labels and value."""
    found = samples(render(snapshot()))
    assert found[f"TYPE:{name.removesuffix('_total')}"] == [({"type": "counter"}, 0.0)]
    assert found[name] == [(dict(zip(labels, values, strict=True)), expected)]


@pytest.mark.parametrize(
    "line",
    [
        'kmeshd_build_info{version="0.1.0"} 1.0',
        'kmeshd_events_total{kind="failed"} 1.0',
        "kmeshd_events_lost_total 3.0",
        "kmeshd_accesslog_records_total 0.0",
        "kmeshd_connections_unattributed_total 4.0",
        'kmeshd_accesslog_records_dropped_total{sink="journald"} 7.0',
        'kmeshd_sink_up{sink="journald"} 0.0',
        'kmeshd_sink_up{sink="textfile"} 0.0',
        "kmeshd_textfile_write_failures_total 2.0",
        'kmeshd_identity_source_up{source="inventory"} 1.0',
        'kmeshd_bpf_map_full_total{map="flows"} 0.0',
        "kmeshd_last_publish_timestamp_seconds 1.7000000005e+09",
    ],
)
def test_self_metrics(line: str) -> None:
    """The daemon's own health is exported under kmeshd_."""
    assert line + "\n" in render(snapshot())


def test_the_textfile_is_no_access_log_sink() -> None:
    """The textfile has a sink_up gauge and its own failure counter, but no series in the
    access-log dropped family; without a textfile, no failure counter either."""
    text = render(snapshot())
    assert 'kmeshd_accesslog_records_dropped_total{sink="textfile"}' not in text
    assert 'kmeshd_accesslog_records_dropped_total{sink="file"} 0.0' in text
    assert "kmeshd_textfile_write_failures_total" not in render(Snapshot(health=Health()))


def test_no_process_or_python_families_in_collector_output() -> None:
    """The collector (what the textfile carries) never emits process_* or python_* families."""
    names = [
        line.split()[2] for line in render(snapshot()).splitlines() if line.startswith("# TYPE")
    ]
    assert names and all(n.startswith(("kmesh_", "kmeshd_")) for n in names)


def published(text: str) -> Body:
    data = text.encode()
    return Body(gzip.compress(data), len(data))


def test_metrics_server_serves_and_reports_port_in_use() -> None:
    """/metrics answers over real HTTP; a second bind of the same port fails with EADDRINUSE."""
    server = MetricsServer("127.0.0.1", 0)
    server.publish(published(render(snapshot())))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert b"kmesh_tcp_workload_received_bytes_total{" in r.read()
        with pytest.raises(OSError) as exc:
            MetricsServer("127.0.0.1", server.port)
        assert exc.value.errno == errno.EADDRINUSE
    finally:
        server.close()


def get(port: int, encoding: str | None) -> tuple[str | None, bytes, str | None]:
    """(Content-Encoding, body, Content-Length) of one scrape."""
    headers = {"Accept-Encoding": encoding} if encoding else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as r:
        return r.headers.get("Content-Encoding"), r.read(), r.headers.get("Content-Length")


def test_a_scraper_that_takes_gzip_gets_it_and_others_get_text() -> None:
    """The published families come gzip-compressed to a scraper that asks for it, inflated
    to one that does not: the same text either way, then the process's own families."""
    text = render(snapshot())
    server = MetricsServer("127.0.0.1", 0)
    server.publish(published(text))
    try:
        encoding, zipped, length = get(server.port, "gzip, deflate")
        assert encoding == "gzip" and int(length or 0) == len(zipped)
        _none, plain, plain_length = get(server.port, None)
        assert _none is None and int(plain_length or 0) == len(plain)
    finally:
        server.close()
    for body in (gzip.decompress(zipped), plain):
        assert body.decode().startswith(text)
        assert "\nprocess_cpu_seconds_total " in body.decode()[len(text) - 1 :]


def test_metrics_server_binds_ipv6_loopback() -> None:
    """An IPv6 listen address works (prometheus-client 0.16's own server cannot)."""
    if not socket.has_ipv6:
        pytest.fail("no IPv6 in this kernel")
    server = MetricsServer("::1", 0)
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/metrics", timeout=5) as r:
            assert r.status == 200
    finally:
        server.close()


def beyond_seed() -> Snapshot:
    """One label set: 3 opened, 1 still open, 2 connects failed (1 refused, 1 other), one
    reset, 4 retransmits of which 3 lost, and histograms with known observations."""
    counts = FlowCounters(
        opened=3, closed=2, failed=2, received_bytes=600, sent_bytes=10, reset=1, refused=1,
        timeout=0, retransmits=4, lost=3,
        duration=(0, 1, 0, 0, 1, *[0] * 13, 60_000),  # 1 ms and 50 ms
        srtt=(0, 1, 1, *[0] * 15, 290),  # 90 µs and 200 µs
        min_rtt=(2, *[0] * 17, 40),  # both at most 50 µs
        connect=(*[0] * 17, 1, 12_000_000),  # 12 s: above the last bound
    )  # fmt: skip
    closed = FlowCounters(opened=1, closed=1)
    other = (*WL[:1], "other", *WL[2:])
    return Snapshot({WL: counts, other: closed}, {SVC: counts}, Health(), {WL: 1}, {SVC: 1})


def one(text: str, name: str, **labels: str) -> float:
    [value] = [v for ls, v in samples(text).get(name, []) if labels.items() <= ls.items()]
    return value


def test_beyond_seed_families_render_exact_values() -> None:
    """Failures by reason (other = failed - refused - timeout), resets, retransmits, lost,
    and the active gauge, which also says 0 for a label set whose connections all closed."""
    text = render(beyond_seed())
    for reason, n in (("refused", 1), ("timeout", 0), ("other", 1)):
        assert one(text, "kmesh_tcp_workload_connect_failures_total", reason=reason) == n
        assert one(text, "kmesh_tcp_connect_failures_total", reason=reason) == n
    assert one(text, "kmesh_tcp_workload_connections_reset_total", source_workload="sleep") == 1
    assert one(text, "kmesh_tcp_workload_retransmits_total", source_workload="sleep") == 4
    assert one(text, "kmesh_tcp_workload_packets_lost_total", source_workload="sleep") == 3
    assert one(text, "kmesh_tcp_workload_connections_active", source_workload="sleep") == 1
    assert one(text, "kmesh_tcp_workload_connections_active", source_workload="other") == 0
    assert one(text, "kmesh_tcp_connections_active") == 1
    assert "TYPE:kmesh_tcp_workload_connections_active" in samples(text)
    assert samples(text)["TYPE:kmesh_tcp_workload_connections_active"][0][0]["type"] == "gauge"


def test_byte_counters_beyond_32_bits_render_exactly() -> None:
    """A byte count past 2**32 (and up to 2**53, where float64 samples stop being whole
    numbers) reaches /metrics digit for digit."""
    for total in (5_000_000_001, 2**53):
        counts = FlowCounters(opened=1, closed=1, received_bytes=total, sent_bytes=total - 1)
        text = render(Snapshot({WL: counts}, {SVC: counts}, Health(), {}, {}))
        for prefix in ("kmesh_tcp_workload_", "kmesh_tcp_"):
            assert one(text, prefix + "received_bytes_total") == total
            assert one(text, prefix + "sent_bytes_total") == total - 1


def test_histograms_are_cumulative_in_seconds() -> None:
    """Kernel per-bucket counts become Prometheus's cumulative buckets with le in seconds,
    the sum in seconds; a label set without observations has no series."""
    text = render(beyond_seed())
    name = "kmesh_tcp_workload_srtt_seconds"
    buckets = {
        ls["le"]: v for ls, v in samples(text)[name + "_bucket"] if ls["source_workload"] == "sleep"
    }
    assert (buckets["5e-05"], buckets["0.0001"], buckets["0.00025"], buckets["+Inf"]) == (
        0,
        1,
        2,
        2,
    )
    assert len(buckets) == 18
    assert one(text, name + "_count", source_workload="sleep") == 2
    assert one(text, name + "_sum", source_workload="sleep") == pytest.approx(0.00029)
    duration = "kmesh_tcp_workload_connection_duration_seconds"
    assert one(text, duration + "_bucket", source_workload="sleep", le="0.001") == 1
    assert one(text, duration + "_bucket", source_workload="sleep", le="0.05") == 2
    assert one(text, duration + "_sum", source_workload="sleep") == pytest.approx(0.06)
    connect = "kmesh_tcp_workload_connect_duration_seconds"
    assert one(text, connect + "_bucket", source_workload="sleep", le="10.0") == 0
    assert one(text, connect + "_bucket", source_workload="sleep", le="+Inf") == 1
    assert not [ls for ls, _ in samples(text)[name + "_bucket"] if ls["source_workload"] == "other"]


def test_beyond_seed_exposition_passes_promtool(tmp_path: Path) -> None:
    """promtool's linter accepts the histograms, the gauge and the reason label."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    path = tmp_path / "m.prom"
    path.write_text(render(beyond_seed()))
    done = subprocess.run([promtool, "check", "metrics"], stdin=path.open(), capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr
