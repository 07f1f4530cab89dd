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
from dataclasses import dataclass

from kmeshd.identity.model import IPAddress, plain_ip

LAYOUT = 3  # KMESHD_LAYOUT in bpf/tcp_probe.h


class Direction(enum.IntEnum):
    OUTBOUND = 1  # this socket connected: the client side
    INBOUND = 2  # this socket was accepted: the server side


class Kind(enum.IntEnum):
    CLOSED = 1
    FAILED = 2


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


class FlowCountersStruct(ctypes.Structure):
    """struct flow_counters"""

    _fields_ = (
        ("opened", ctypes.c_uint64),
        ("closed", ctypes.c_uint64),
        ("failed", ctypes.c_uint64),
        ("received_bytes", ctypes.c_uint64),
        ("sent_bytes", ctypes.c_uint64),
    )


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


@dataclass(frozen=True, slots=True)
class FlowCounters:
    """Cumulative counts of one flow; bytes as the destination sees them (Istio)."""

    opened: int = 0
    closed: int = 0
    failed: int = 0
    received_bytes: int = 0
    sent_bytes: int = 0

    def __sub__(self, other: FlowCounters) -> FlowCounters:
        return FlowCounters(
            self.opened - other.opened,
            self.closed - other.closed,
            self.failed - other.failed,
            self.received_bytes - other.received_bytes,
            self.sent_bytes - other.sent_bytes,
        )

    def __add__(self, other: FlowCounters) -> FlowCounters:
        return FlowCounters(
            self.opened + other.opened,
            self.closed + other.closed,
            self.failed + other.failed,
            self.received_bytes + other.received_bytes,
            self.sent_bytes + other.sent_bytes,
        )

    def is_zero(self) -> bool:
        return self == ZERO

    def any_negative(self) -> bool:
        return min(self.opened, self.closed, self.failed, self.received_bytes, self.sent_bytes) < 0


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


def decode_flow(key: bytes, value: bytes) -> tuple[FlowKey, FlowCounters]:
    k = FlowKeyStruct.from_buffer_copy(key)
    v = FlowCountersStruct.from_buffer_copy(value)
    return (
        FlowKey(
            decode_address(bytes(k.client)),
            decode_address(bytes(k.server)),
            k.server_port,
            Direction(k.direction),
        ),
        FlowCounters(v.opened, v.closed, v.failed, v.received_bytes, v.sent_bytes),
    )


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
