"""Decode what the kernel probe hands over: bytes in, frozen dataclasses out.

Each struct is read through its mirror in kmeshd.kernel.layout (one `struct` unpack per
record or flow). Addresses arrive as 16 bytes, IPv4 v4-mapped; they leave as ipaddress
objects, IPv4 plain.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from kmeshd.identity.model import IPAddress, plain_ip
from kmeshd.kernel.layout import (
    BUCKETS,
    CONN_RECORD,
    FLOW_COUNTERS,
    FLOW_KEY,
    Direction,
    Kind,
    Reason,
    RecordFlag,
)


@dataclass(frozen=True, slots=True)
class FlowKey:
    client: IPAddress
    server: IPAddress
    server_port: int
    direction: Direction


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


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """One closed socket or failed connect, as this host's socket saw it."""

    time_ns: int  # CLOCK_MONOTONIC
    duration_ns: int
    received_bytes: int  # by the destination
    sent_bytes: int  # by the destination
    local: IPAddress
    local_port: int
    remote: IPAddress
    remote_port: int
    kind: Kind
    direction: Direction
    reason: Reason
    reset: bool
    srtt_us: int
    min_rtt_us: int
    retransmits: int
    segs_in: int
    segs_out: int


@functools.lru_cache(maxsize=65536)  # few distinct addresses, decoded once per record
def decode_address(raw: bytes) -> IPAddress:
    """16 kernel bytes -> an address; v4-mapped becomes plain IPv4."""
    return plain_ip(ipaddress.IPv6Address(raw))


def encode_address(ip: IPAddress) -> bytes:
    """An address -> the 16 bytes the kernel compares (IPv4 v4-mapped)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def decode_flow_key(key: bytes) -> FlowKey:
    client, server, server_port, direction, _pad = FLOW_KEY.codec.unpack_from(key)
    return FlowKey(
        decode_address(client), decode_address(server), server_port, Direction(direction)
    )


def decode_flow(key: bytes, value: bytes) -> tuple[FlowKey, FlowCounters]:
    return decode_flow_key(key), FlowCounters.from_vector(FLOW_COUNTERS.codec.unpack_from(value))


_KINDS = {k.value: k for k in Kind}
_DIRECTIONS = {d.value: d for d in Direction}
_REASONS = {r.value: r for r in Reason}


def decode_record(data: bytes) -> ConnectionRecord:
    (time_ns, duration, received, sent, local, remote, local_port, remote_port,
     kind, direction, reason, flags, srtt, min_rtt, retrans, segs_in, segs_out, _) = (
        CONN_RECORD.codec.unpack_from(data)
    )  # fmt: skip
    return ConnectionRecord(
        time_ns=time_ns,
        duration_ns=duration,
        received_bytes=received,
        sent_bytes=sent,
        local=decode_address(local),
        local_port=local_port,
        remote=decode_address(remote),
        remote_port=remote_port,
        kind=_KINDS[kind],
        direction=_DIRECTIONS[direction],
        reason=_REASONS[reason],
        reset=bool(flags & RecordFlag.RESET),
        srtt_us=srtt,
        min_rtt_us=min_rtt,
        retransmits=retrans,
        segs_in=segs_in,
        segs_out=segs_out,
    )
