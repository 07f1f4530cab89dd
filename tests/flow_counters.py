"""A whole struct flow_counters as one value, for tests that build and read kernel flows:
the daemon itself reads only the slots it exports (aggregate.Slots)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kmeshd.events import FlowKey, decode_flow_key
from kmeshd.kernel.layout import BUCKETS, FLOW_COUNTERS

Histogram = tuple[int, ...]
"""BUCKETS per-bucket counts (not cumulative), then the sum in microseconds."""

EMPTY: Histogram = (0,) * (BUCKETS + 1)


@dataclass(frozen=True, slots=True)
class FlowCounters:
    """Cumulative counts of one flow (struct flow_counters); bytes as the destination sees
    them (Istio). Adding and subtracting work field by field, histogram slots included."""

    opened: int = 0
    closed: int = 0
    failed: int = 0
    received_bytes: int = 0
    sent_bytes: int = 0
    reset: int = 0  # established, then ended by a RST received
    refused: int = 0  # failed: a RST answered the SYN
    timeout: int = 0  # failed: the SYN was never answered
    retransmits: int = 0
    lost: int = 0
    duration: Histogram = EMPTY
    srtt: Histogram = EMPTY
    min_rtt: Histogram = EMPTY
    connect: Histogram = EMPTY

    def vector(self) -> tuple[int, ...]:
        """Every count in struct order: the histograms' slots inline."""
        return (
            self.opened, self.closed, self.failed, self.received_bytes, self.sent_bytes,
            self.reset, self.refused, self.timeout, self.retransmits, self.lost,
            *self.duration, *self.srtt, *self.min_rtt, *self.connect,
        )  # fmt: skip

    @classmethod
    def from_vector(cls, v: Sequence[int]) -> FlowCounters:
        h = BUCKETS + 1
        hists = [tuple(v[_SCALARS + i * h : _SCALARS + (i + 1) * h]) for i in range(4)]
        opened, closed, failed, received, sent, reset, refused, timeout, retrans, lost = v[
            :_SCALARS
        ]
        return cls(
            opened, closed, failed, received, sent, reset, refused, timeout, retrans, lost, *hists
        )

    @property
    def other_failures(self) -> int:
        return self.failed - self.refused - self.timeout

    @property
    def active(self) -> int:
        return max(0, self.opened - self.closed)

    def __sub__(self, other: FlowCounters) -> FlowCounters:
        return FlowCounters.from_vector(
            [a - b for a, b in zip(self.vector(), other.vector(), strict=True)]
        )

    def __add__(self, other: FlowCounters) -> FlowCounters:
        return FlowCounters.from_vector(
            [a + b for a, b in zip(self.vector(), other.vector(), strict=True)]
        )

    def is_zero(self) -> bool:
        return self == ZERO

    def any_negative(self) -> bool:
        return min(self.vector()) < 0


_SCALARS = 10
ZERO = FlowCounters()


def decode_flow(key: bytes, value: bytes) -> tuple[FlowKey, FlowCounters]:
    return decode_flow_key(key), FlowCounters.from_vector(FLOW_COUNTERS.codec.unpack_from(value))
