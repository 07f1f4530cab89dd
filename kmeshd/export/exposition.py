"""The kmesh_* families as Prometheus text (format 0.0.4), rendered once per publish.

A node's label sets run to thousands, each with 23 labels, so the text is large and its
labels are most of it. Each label set's label text is rendered once and reused by every
family and every publish; the families are rendered in one pass per publish, streamed to
the textfile and to gzip, and scrapes are served from the compressed bytes (see http.py).

What one label set costs, at each level: a line in each of the eight counter families and
the active gauge (9 lines), three more in connect_failures_total if it ever failed, and
20 per histogram metrics.histograms selects (18 buckets, _count, _sum). Labels come in
their documented order.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.utils import floatToGoString

from kmeshd.aggregate import CLOSED, FAILED, LabelSet, Ledger, Slots
from kmeshd.kernel.layout import DURATION_BOUNDS_US, LATENCY_BOUNDS_US
from kmeshd.labels import SERVICE_LABELS, WORKLOAD_LABELS, LabelValues

# (slot, family suffix, what it counts): the seed's five counters per level (ten
# families), then three of kmeshd's own.
COUNTERS = (
    (0, "connections_opened", "The total number of TCP connections opened to a {}"),
    (CLOSED, "connections_closed", "The total number of TCP connections closed to a {}"),
    (
        3,
        "received_bytes",
        "The size of the total number of bytes received in response to a {} over a TCP connection",
    ),
    (
        4,
        "sent_bytes",
        "The size of the total number of bytes sent in response to a {} over a TCP connection",
    ),
    (FAILED, "connections_failed", "The total number of TCP connections failed to a {}"),
    (
        5,
        "connections_reset",
        "TCP connections to a {} that were established and then ended by a reset received",
    ),
    (8, "retransmits", "TCP segments retransmitted on connections to a {}"),
    (
        9,
        "packets_lost",
        "TCP segments lost on connections to a {}: retransmissions not shown to be spurious"
        " by a D-SACK",
    ),
)
REFUSED, TIMEOUT = 6, 7

# (histogram, family suffix, what it measures, bucket bounds in µs)
HISTOGRAM_FAMILIES = (
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

FAMILY_LEVELS = (  # level, family prefix, label names
    ("workload", "kmesh_tcp_workload_", WORKLOAD_LABELS),
    ("service", "kmesh_tcp_", SERVICE_LABELS),
)


def _go_float(value: float) -> str:
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


def _number(value: float) -> str:
    """A sample value as prometheus_client writes it ("292.0", "5.000000001e+09"); the
    common case, a small integer, without its float formatting."""
    if value.__class__ is int and 0 <= value < 1_000_000:
        return f"{value}.0"
    return _go_float(value)


def escape(value: str) -> str:
    """A label value as the text format writes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _header(name: str, doc: str, kind: str) -> str:
    doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def le_value(bound_us: int | None) -> str:
    """A bucket bound in µs as its le label, as prometheus_client writes it: 50 -> 5e-05."""
    return "+Inf" if bound_us is None else _go_float(bound_us / 1e6)


# Each histogram's le label values, written once.
_LES = {h: [le_value(b) for b in (*bounds, None)] for h, _s, _d, bounds in HISTOGRAM_FAMILIES}


class Exposition:
    """Renders a Ledger's label sets. Keeps each label set's label text between publishes
    (and drops the texts of label sets that left)."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self._texts: dict[tuple[str, LabelValues], str] = {}

    def render(self, ledger: Ledger) -> Iterator[str]:
        """The kmesh_* families, a family (or less) at a time."""
        live = 0
        for level, prefix, names in FAMILY_LEVELS:
            series_of = ledger.levels[level]
            live += len(series_of)
            texts = [(self._text(level, names, labels), s) for labels, s in series_of.items()]
            yield from self._counters(prefix, level, texts)
            yield self._failures(prefix, level, texts)
            yield from self._histograms(prefix, level, texts)
            yield self._active(prefix, level, texts)
        if len(self._texts) > 2 * live + 1024:  # label sets left: forget their texts
            keep = {(lv, labels) for lv, _p, _n in FAMILY_LEVELS for labels in ledger.levels[lv]}
            self._texts = {k: v for k, v in self._texts.items() if k in keep}

    def _text(self, level: str, names: tuple[str, ...], labels: LabelValues) -> str:
        text = self._texts.get((level, labels))
        if text is None:
            text = ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, labels, strict=True))
            self._texts[(level, labels)] = text
        return text

    @staticmethod
    def _counters(prefix: str, level: str, texts: list[tuple[str, LabelSet]]) -> Iterator[str]:
        for slot, suffix, doc in COUNTERS:
            name = f"{prefix}{suffix}_total"
            lines = [_header(name, doc.format(level), "counter")]
            lines += [f"{name}{{{t}}} {_number(s.counts[slot])}\n" for t, s in texts]
            yield "".join(lines)

    @staticmethod
    def _failures(prefix: str, level: str, texts: list[tuple[str, LabelSet]]) -> str:
        """Connects that never established, by reason; only label sets that had one."""
        name = f"{prefix}connect_failures_total"
        doc = (
            f"TCP connects to a {level} that never established, by reason: refused (a reset"
            " answered the SYN), timeout (the SYN was never answered), other"
        )
        lines = [_header(name, doc, "counter")]
        for t, s in texts:
            c = s.counts
            if c[FAILED]:
                other = c[FAILED] - c[REFUSED] - c[TIMEOUT]
                for reason, n in (
                    ("refused", c[REFUSED]),
                    ("timeout", c[TIMEOUT]),
                    ("other", other),
                ):
                    lines.append(f'{name}{{{t},reason="{reason}"}} {_number(n)}\n')
        return "".join(lines)

    def _histograms(
        self, prefix: str, level: str, texts: list[tuple[str, LabelSet]]
    ) -> Iterator[str]:
        for histogram, suffix, doc, _bounds in HISTOGRAM_FAMILIES:
            if histogram not in self.slots.histograms:
                continue
            name = prefix + suffix
            les = _LES[histogram]
            start = self.slots.offset(histogram)
            lines = [_header(name, doc.format(level), "histogram")]
            for t, s in texts:
                slots = s.counts[start : start + len(les) + 1]
                total = sum(slots[:-1])
                if not total:  # no observation (the destination's handshakes): no series
                    continue
                running = 0
                for le, n in zip(les, slots, strict=False):
                    running += n
                    lines.append(f'{name}_bucket{{{t},le="{le}"}} {_number(running)}\n')
                lines.append(f"{name}_count{{{t}}} {_number(total)}\n")
                lines.append(f"{name}_sum{{{t}}} {_number(slots[-1] / 1e6)}\n")
            yield "".join(lines)

    @staticmethod
    def _active(prefix: str, level: str, texts: list[tuple[str, LabelSet]]) -> str:
        """Every label set gets a value, 0 included: a graph shows no gap when a workload's
        last connection closes."""
        name = f"{prefix}connections_active"
        lines = [_header(name, f"TCP connections to a {level} open now", "gauge")]
        lines += [f"{name}{{{t}}} {_number(s.active)}\n" for t, s in texts]
        return "".join(lines)
