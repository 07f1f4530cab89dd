"""Decode what the kernel probe hands over: bytes in, frozen dataclasses out.

The ctypes structures mirror `bpf/tcp_probe.h` field for field (tests compare their
sizes with the header's _Static_asserts). Addresses arrive as 16 bytes, IPv4 v4-mapped;
they leave as ipaddress objects, IPv4 plain.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kmeshd.identity.model import IPAddress, plain_ip

LAYOUT = 6  # KMESHD_LAYOUT in bpf/tcp_probe.h


class Direction(enum.IntEnum):
    OUTBOUND = 1  # this socket connected: the client side
    INBOUND = 2  # this socket was accepted: the server side


class Kind(enum.IntEnum):
    CLOSED = 1
    FAILED = 2
    PROGRESS = 3  # an open connection's totals so far (accesslog.periodic)


class Reason(enum.IntEnum):
    NONE = 0
    REFUSED = 1
    TIMEOUT = 2
    OTHER = 3


class Stat(enum.IntEnum):
    """Indexes of the per-CPU `stats` array (STAT_* in the header)."""

    OPENED = 0
    CLOSED = 1
    FAILED = 2
    UNATTRIBUTED = 3
    RINGBUF_LOST = 4
    FLOWS_FULL = 5
    SOCKS_FULL = 6


RECORD_RESET = 1


class FlowKeyStruct(ctypes.Structure):
    """struct flow_key"""

    _fields_ = (
        ("client", ctypes.c_uint8 * 16),
        ("server", ctypes.c_uint8 * 16),
        ("server_port", ctypes.c_uint16),
        ("direction", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
    )


# Histogram bucket upper bounds in microseconds (LATENCY_BOUNDS_US and DURATION_BOUNDS_US
# in the header; a test compares them), and the slots per histogram: one per bound, one
# for what lies above the last, then the sum.
LATENCY_BOUNDS_US = (
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
)  # fmt: skip
DURATION_BOUNDS_US = (
    500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000, 10_000_000,
    30_000_000, 60_000_000, 300_000_000, 600_000_000, 1_800_000_000, 3_600_000_000,
    14_400_000_000,
)  # fmt: skip
BUCKETS = 18


class HistogramStruct(ctypes.Structure):
    """struct histogram"""

    _fields_ = (("buckets", ctypes.c_uint64 * BUCKETS), ("sum_us", ctypes.c_uint64))


class FlowCountersStruct(ctypes.Structure):
    """struct flow_counters"""

    _fields_ = (
        ("opened", ctypes.c_uint64),
        ("closed", ctypes.c_uint64),
        ("failed", ctypes.c_uint64),
        ("received_bytes", ctypes.c_uint64),
        ("sent_bytes", ctypes.c_uint64),
        ("reset", ctypes.c_uint64),
        ("refused", ctypes.c_uint64),
        ("timeout", ctypes.c_uint64),
        ("retransmits", ctypes.c_uint64),
        ("lost", ctypes.c_uint64),
        ("duration", HistogramStruct),
        ("srtt", HistogramStruct),
        ("min_rtt", HistogramStruct),
        ("connect", HistogramStruct),
    )


class SockStateStruct(ctypes.Structure):
    """struct sock_state"""

    _fields_ = (
        ("key", FlowKeyStruct),
        ("flags", ctypes.c_uint16),
        ("client_port", ctypes.c_uint16),
        ("start_ns", ctypes.c_uint64),
        ("established_ns", ctypes.c_uint64),
        ("reported_sent", ctypes.c_uint64),
        ("reported_received", ctypes.c_uint64),
        ("last_record_ns", ctypes.c_uint64),
        ("reported_retrans", ctypes.c_uint32),
        ("reported_lost", ctypes.c_uint32),
    )


SF_ESTABLISHED = 1


class ConnRecordStruct(ctypes.Structure):
    """struct conn_record"""

    _fields_ = (
        ("time_ns", ctypes.c_uint64),
        ("duration_ns", ctypes.c_uint64),
        ("received_bytes", ctypes.c_uint64),
        ("sent_bytes", ctypes.c_uint64),
        ("local", ctypes.c_uint8 * 16),
        ("remote", ctypes.c_uint8 * 16),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("kind", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("srtt_us", ctypes.c_uint32),
        ("min_rtt_us", ctypes.c_uint32),
        ("total_retrans", ctypes.c_uint32),
        ("segs_in", ctypes.c_uint32),
        ("segs_out", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
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
_FLOW_VALUE = struct.Struct(f"<{_SCALARS + 4 * (BUCKETS + 1)}Q")
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
    k = FlowKeyStruct.from_buffer_copy(key)
    return FlowKey(
        decode_address(bytes(k.client)),
        decode_address(bytes(k.server)),
        k.server_port,
        Direction(k.direction),
    )


def decode_flow(key: bytes, value: bytes) -> tuple[FlowKey, FlowCounters]:
    return decode_flow_key(key), FlowCounters.from_vector(_FLOW_VALUE.unpack_from(value))


# struct conn_record, for the hot path: one unpack is several times cheaper than ctypes.
_RECORD = struct.Struct("<4Q16s16s2H4B6I")
_KINDS = {k.value: k for k in Kind}
_DIRECTIONS = {d.value: d for d in Direction}
_REASONS = {r.value: r for r in Reason}


def decode_record(data: bytes) -> ConnectionRecord:
    (time_ns, duration, received, sent, local, remote, local_port, remote_port,
     kind, direction, reason, flags, srtt, min_rtt, retrans, segs_in, segs_out, _) = (
        _RECORD.unpack_from(data)
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
        reset=bool(flags & RECORD_RESET),
        srtt_us=srtt,
        min_rtt_us=min_rtt,
        retransmits=retrans,
        segs_in=segs_in,
        segs_out=segs_out,
    )
