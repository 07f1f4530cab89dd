"""The daemon's own health as Prometheus families (kmeshd_*), through prometheus_client:
they are few, so they are rendered with each publish by its own machinery. The kmesh_*
families, many, have a renderer of their own (exposition.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


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
    sweep_unreached: int = 0  # open sockets the last socket sweep could not read
    sweep_busy: int = 0  # sweep visits that found the socket in use
    sinks: tuple[SinkHealth, ...] = ()
    textfile_failures: int | None = None  # failed textfile writes; None: no textfile
    state_failures: int | None = None  # failed saves of metrics.state_file; None: no file
    sources: Mapping[str, bool] = field(default_factory=dict)
    # (source, resource) -> objects an identity source skipped as not valid
    objects_rejected: Mapping[tuple[str, str], int] = field(default_factory=dict)
    last_publish: float = 0.0
    publish_seconds: float = 0.0
    publish_interval: float = 0.0  # metrics.interval: what an alert on the last publish needs
    textfile_write_seconds: float | None = None  # the last write; None: no textfile
    series: Mapping[str, int] = field(default_factory=dict)  # level -> label sets now
    series_overflow: Mapping[str, int] = field(default_factory=dict)  # level -> folded
    series_expired: int = 0
    map_entries: Mapping[str, int] = field(default_factory=dict)  # map -> entries now
    map_capacity: Mapping[str, int] = field(default_factory=dict)  # map -> max entries
    flow_generations: int = 0  # generations of kernel flow entries retired
    publish_errors: int = 0  # publishes that raised (logged; the next one runs)
    loop_errors: Mapping[str, int] = field(default_factory=dict)  # main-loop step -> raised
    thread_restarts: Mapping[str, int] = field(default_factory=dict)  # thread -> restarts
    records_failed: int = 0  # kernel records no access-log record could be made of
    http_refused: int | None = None  # /metrics connections refused; None: no listener


class HealthCollector(Collector):
    """The families of one Health."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        return _health(self.health)


def health_text(health: Health) -> str:
    """The kmeshd_* families of `health` as Prometheus text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HealthCollector(health))
    return generate_latest(registry).decode()


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
    yield GaugeMetricFamily(
        "kmeshd_sweep_sockets_unreached",
        "Open connections the last socket sweep (bpf.live_updates) could not read: no process"
        " holds a file of them (an accept queue, io_uring, the kernel) or they stayed busy;"
        " their bytes come at a later sweep or at the close",
        value=h.sweep_unreached,
    )
    yield CounterMetricFamily(
        "kmeshd_sweep_sockets_busy_total",
        "Socket sweep visits that found the socket in use three times and left it to the next",
        value=h.sweep_busy,
    )
    yield _counter(
        "kmeshd_accesslog_records_dropped_total",
        "Access-log records a sink could not take, by sink",
        "sink",
        {s.name: s.dropped for s in h.sinks if s.dropped is not None},
    )
    if h.state_failures is not None:
        yield CounterMetricFamily(
            "kmeshd_state_save_failures_total",
            "Saves of metrics.state_file that failed (a restart would count from zero)",
            value=h.state_failures,
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
    rejected = CounterMetricFamily(
        "kmeshd_identity_objects_rejected_total",
        "Kubernetes objects an identity source skipped as not valid (each time received)",
        labels=["source", "resource"],
    )
    for (source, resource), count in sorted(h.objects_rejected.items()):
        rejected.add_metric([source, resource], count)
    yield rejected
    yield GaugeMetricFamily(
        "kmeshd_last_publish_timestamp_seconds",
        "When metrics were last published (Unix time)",
        value=h.last_publish,
    )
    yield GaugeMetricFamily(
        "kmeshd_publish_interval_seconds",
        "How often metrics are published (metrics.interval)",
        value=h.publish_interval,
    )
    yield GaugeMetricFamily(
        "kmeshd_publish_duration_seconds",
        "How long the last publish took",
        value=h.publish_seconds,
    )
    if h.textfile_write_seconds is not None:
        yield GaugeMetricFamily(
            "kmeshd_textfile_write_duration_seconds",
            "How long the last textfile write took (rendering included)",
            value=h.textfile_write_seconds,
        )
    yield _gauge(
        "kmeshd_series",
        "Label sets exported now, by level (the overflow label set included)",
        "level",
        h.series,
    )
    yield _counter(
        "kmeshd_series_overflow_total",
        "Label sets folded into the level's overflow label set because the level had"
        " metrics.max_series label sets",
        "level",
        h.series_overflow,
    )
    yield CounterMetricFamily(
        "kmeshd_series_expired_total",
        "Label sets that left: an identity they name is gone, and they had no open"
        " connection and no change for metrics.series_ttl",
        value=h.series_expired,
    )
    yield _gauge(
        "kmeshd_bpf_map_entries",
        "Entries in a BPF map now, by map",
        "map",
        h.map_entries,
    )
    yield CounterMetricFamily(
        "kmeshd_bpf_flow_generations_total",
        "Generations of the kernel's flow entries retired: read a last time and removed"
        " (every bpf.flow_expiry)",
        value=h.flow_generations,
    )
    yield _gauge(
        "kmeshd_bpf_map_capacity",
        "The most entries a BPF map can hold, by map",
        "map",
        h.map_capacity,
    )
    yield from _failures(h)


def _failures(h: Health) -> Iterator[Metric]:
    """What went wrong inside the daemon and was survived (see kmeshd/supervise.py)."""
    yield CounterMetricFamily(
        "kmeshd_publish_errors_total",
        "Publishes that failed (logged with the error; the next one runs as usual)",
        value=h.publish_errors,
    )
    yield _counter(
        "kmeshd_loop_errors_total",
        "Failures of a main-loop step other than the publish, by step (logged)",
        "step",
        h.loop_errors,
    )
    yield _counter(
        "kmeshd_thread_restarts_total",
        "Times a thread failed and was started again, by thread (logged)",
        "thread",
        h.thread_restarts,
    )
    yield CounterMetricFamily(
        "kmeshd_accesslog_records_failed_total",
        "Records from the kernel that no access-log record could be made of (logged)",
        value=h.records_failed,
    )
    if h.http_refused is not None:
        yield CounterMetricFamily(
            "kmeshd_http_connections_refused_total",
            "Connections to metrics.listen closed unanswered: as many were being served as"
            " kmeshd serves at once (64)",
            value=h.http_refused,
        )
