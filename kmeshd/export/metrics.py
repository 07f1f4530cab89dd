"""One prometheus_client Collector over the last published snapshot.

A scrape reads whatever snapshot was swapped in last (one reference assignment), so it
never waits on the event path or on a publish in progress.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kmeshd.events import FlowCounters, Histogram
from kmeshd.kernel.layout import DURATION_BOUNDS_US, LATENCY_BOUNDS_US
from kmeshd.labels import SERVICE_LABELS, WORKLOAD_LABELS, LabelValues

# (field of FlowCounters, family suffix, what it counts): the seed's five counters per
# level (ten families), then three of kmeshd's own.
FAMILIES = (
    ("opened", "connections_opened", "The total number of TCP connections opened to a {}"),
    ("closed", "connections_closed", "The total number of TCP connections closed to a {}"),
    (
        "received_bytes",
        "received_bytes",
        "The size of the total number of bytes received in response to a {} over a TCP connection",
    ),
    (
        "sent_bytes",
        "sent_bytes",
        "The size of the total number of bytes sent in response to a {} over a TCP connection",
    ),
    ("failed", "connections_failed", "The total number of TCP connections failed to a {}"),
    # Beyond the seed: what else a TCP connection tells.
    (
        "reset",
        "connections_reset",
        "TCP connections to a {} that were established and then ended by a reset received",
    ),
    ("retransmits", "retransmits", "TCP segments retransmitted on connections to a {}"),
    (
        "lost",
        "packets_lost",
        "TCP segments lost on connections to a {}: retransmissions not shown to be spurious"
        " by a D-SACK",
    ),
)

# (field of FlowCounters, family suffix, what it measures, bucket bounds in µs)
HISTOGRAMS = (
    (
        "duration",
        "connection_duration_seconds",
        "How long TCP connections to a {} lasted, establishment to close",
        DURATION_BOUNDS_US,
    ),
    (
        "srtt",
        "srtt_seconds",
        "Smoothed round-trip time of TCP connections to a {}, at close",
        LATENCY_BOUNDS_US,
    ),
    (
        "min_rtt",
        "min_rtt_seconds",
        "Minimum round-trip time of TCP connections to a {}, at close",
        LATENCY_BOUNDS_US,
    ),
    (
        "connect",
        "connect_duration_seconds",
        "Handshake time of TCP connections to a {}, connect() to established (source only)",
        LATENCY_BOUNDS_US,
    ),
)

# The reason label of *_connect_failures_total, and the FlowCounters attribute of each.
CONNECT_FAILURES = (
    ("refused", "refused"),  # a RST answered the SYN
    ("timeout", "timeout"),  # the SYN was never answered
    ("other", "other_failures"),
)


@dataclass(frozen=True)
class SinkHealth:
    name: str
    up: bool
    dropped: int | None  # access-log records it could not take; None: the textfile


@dataclass(frozen=True)
class Health:
    """The daemon's own state, exported under kmeshd_."""

    version: str = "unknown"
    events: Mapping[str, int] = field(default_factory=dict)  # kind -> seen by the probe
    events_lost: int = 0
    records: int = 0  # access-log records taken from the ring buffer
    map_full: Mapping[str, int] = field(default_factory=dict)  # map -> refused entries
    unattributed: int = 0
    unseen_closes: int = 0  # closes the sweep found (no probe was attached)
    sinks: tuple[SinkHealth, ...] = ()
    textfile_failures: int | None = None  # failed textfile writes; None: no textfile
    sources: Mapping[str, bool] = field(default_factory=dict)
    last_publish: float = 0.0
    publish_seconds: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    workload: Mapping[LabelValues, FlowCounters] = field(default_factory=dict)
    service: Mapping[LabelValues, FlowCounters] = field(default_factory=dict)
    health: Health = field(default_factory=Health)
    active_workload: Mapping[LabelValues, int] = field(default_factory=dict)
    active_service: Mapping[LabelValues, int] = field(default_factory=dict)


class KmeshCollector(Collector):
    def __init__(self) -> None:
        self._snapshot = Snapshot()

    def update(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot
        levels = (
            (
                "kmesh_tcp_workload_",
                "workload",
                WORKLOAD_LABELS,
                snap.workload,
                snap.active_workload,
            ),
            ("kmesh_tcp_", "service", SERVICE_LABELS, snap.service, snap.active_service),
        )
        for prefix, what, labels, totals, active in levels:
            yield from _traffic(prefix, what, labels, totals)
            yield from _failures(prefix, what, labels, totals)
            yield from _histograms(prefix, what, labels, totals)
            yield _active(prefix, what, labels, totals, active)
        yield from _health(snap.health)


def _traffic(
    prefix: str, what: str, labels: tuple[str, ...], totals: Mapping[LabelValues, FlowCounters]
) -> Iterator[Metric]:
    for attr, suffix, doc in FAMILIES:
        family = CounterMetricFamily(prefix + suffix, doc.format(what), labels=labels)
        for values, counts in totals.items():
            family.add_metric(values, getattr(counts, attr))
        yield family


def _failures(
    prefix: str, what: str, labels: tuple[str, ...], totals: Mapping[LabelValues, FlowCounters]
) -> Iterator[Metric]:
    """Connects that never established, by reason; only label sets that had one."""
    family = CounterMetricFamily(
        prefix + "connect_failures",
        f"TCP connects to a {what} that never established, by reason: refused (a reset"
        " answered the SYN), timeout (the SYN was never answered), other",
        labels=(*labels, "reason"),
    )
    for values, counts in totals.items():
        if counts.failed:
            for reason, attr in CONNECT_FAILURES:
                family.add_metric((*values, reason), getattr(counts, attr))
    yield family


def _histograms(
    prefix: str, what: str, labels: tuple[str, ...], totals: Mapping[LabelValues, FlowCounters]
) -> Iterator[Metric]:
    for attr, suffix, doc, bounds in HISTOGRAMS:
        family = HistogramMetricFamily(prefix + suffix, doc.format(what), labels=labels)
        for values, counts in totals.items():
            hist: Histogram = getattr(counts, attr)
            buckets = cumulative_buckets(hist, bounds)
            if buckets[-1][1]:  # no observation (the destination's handshakes): no series
                family.add_metric(values, buckets, hist[-1] / 1e6)
        yield family


def cumulative_buckets(hist: Histogram, bounds_us: tuple[int, ...]) -> list[tuple[str, int]]:
    """Per-bucket counts -> Prometheus's cumulative (le, count) pairs, le in seconds."""
    out, total = [], 0
    for bound, n in zip((*bounds_us, None), hist[:-1], strict=True):
        total += n
        out.append(("+Inf" if bound is None else _seconds(bound), total))
    return out


def _seconds(us: int) -> str:
    """A bound in µs as le, written as prometheus_client writes its own: 50 -> "5e-05"."""
    return str(floatToGoString(us / 1e6))  # type: ignore[no-untyped-call]


def _active(
    prefix: str,
    what: str,
    labels: tuple[str, ...],
    totals: Mapping[LabelValues, FlowCounters],
    active: Mapping[LabelValues, int],
) -> Metric:
    """Every label set with traffic gets a value, 0 included: a graph shows no gap when a
    workload's last connection closes."""
    family = GaugeMetricFamily(
        prefix + "connections_active", f"TCP connections to a {what} open now", labels=labels
    )
    for values in totals.keys() | active.keys():
        family.add_metric(values, active.get(values, 0))
    return family


def _counter(name: str, doc: str, label: str, values: Mapping[str, int | float]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _gauge(name: str, doc: str, label: str, values: Mapping[str, int | float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _health(h: Health) -> Iterator[Metric]:
    yield _gauge("kmeshd_build_info", "kmeshd version; always 1", "version", {h.version: 1})
    yield _counter(
        "kmeshd_events_total", "TCP events of sockets with a known end, by kind", "kind", h.events
    )
    yield CounterMetricFamily(
        "kmeshd_events_lost_total",
        "Access-log records the kernel could not queue (ring buffer full)",
        value=h.events_lost,
    )
    yield CounterMetricFamily(
        "kmeshd_accesslog_records_total",
        "Access-log records taken from the kernel and handed to the sinks",
        value=h.records,
    )
    yield _counter(
        "kmeshd_bpf_map_full_total",
        "Entries a BPF map refused because it was full, by map",
        "map",
        h.map_full,
    )
    yield CounterMetricFamily(
        "kmeshd_connections_unattributed_total",
        "Connections with neither end a known workload or service; not in kmesh_* families",
        value=h.unattributed,
    )
    yield CounterMetricFamily(
        "kmeshd_connections_closed_unobserved_total",
        "Connections that closed while no probe was attached (kmeshd stopped), found by the"
        " socket sweep: counted as closed, their bytes since the last live update unknown",
        value=h.unseen_closes,
    )
    yield _counter(
        "kmeshd_accesslog_records_dropped_total",
        "Access-log records a sink could not take, by sink",
        "sink",
        {s.name: s.dropped for s in h.sinks if s.dropped is not None},
    )
    if h.textfile_failures is not None:
        yield CounterMetricFamily(
            "kmeshd_textfile_write_failures_total",
            "Publishes whose textfile could not be written (the previous one stays in place)",
            value=h.textfile_failures,
        )
    yield _gauge(
        "kmeshd_sink_up",
        "1 while the sink works, 0 while it fails",
        "sink",
        {s.name: int(s.up) for s in h.sinks},
    )
    yield _gauge(
        "kmeshd_identity_source_up",
        "1 while the identity source's last sync succeeded, else 0",
        "source",
        {k: int(v) for k, v in h.sources.items()},
    )
    yield GaugeMetricFamily(
        "kmeshd_last_publish_timestamp_seconds",
        "When metrics were last published (Unix time)",
        value=h.last_publish,
    )
    yield GaugeMetricFamily(
        "kmeshd_publish_duration_seconds",
        "How long the last publish took",
        value=h.publish_seconds,
    )
