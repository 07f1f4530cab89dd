"""Decode what the kernel probe hands over: bytes in, frozen dataclasses out.

Each struct is read through its mirror in kmeshd.kernel.layout (one `struct` unpack per
record or flow). Addresses arrive as 16 bytes, IPv4 v4-mapped; they leave as ipaddress
objects, IPv4 plain.

A ring-buffer record is checked before it is believed: a size other than struct
conn_record's, or a kind, direction or reason this version does not know (a probe built
from another version's header), is a BadRecord, never a half-decoded record; the record
feed counts it and carries on.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import TypeVar

from kmeshd.identity.model import IPAddress, plain_ip
from kmeshd.kernel.layout import (
    CONN_RECORD,
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


_E = TypeVar("_E")
_KINDS = {k.value: k for k in Kind}
_DIRECTIONS = {d.value: d for d in Direction}
_REASONS = {r.value: r for r in Reason}


class BadRecord(ValueError):
    """Bytes that are not a struct conn_record of this version; the message says why."""


def _known(table: dict[int, _E], value: int, what: str) -> _E:
    try:
        return table[value]
    except KeyError:
        raise BadRecord(f"unknown {what} {value}") from None


def decode_record(data: bytes) -> ConnectionRecord:
    """A ring-buffer record -> ConnectionRecord; BadRecord if it is not one."""
    if len(data) != CONN_RECORD.size:
        raise BadRecord(f"{len(data)} bytes, not the {CONN_RECORD.size} of struct conn_record")
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
        kind=_known(_KINDS, kind, "kind"),
        direction=_known(_DIRECTIONS, direction, "direction"),
        reason=_known(_REASONS, reason, "reason"),
        reset=bool(flags & RecordFlag.RESET),
        srtt_us=srtt,
        min_rtt_us=min_rtt,
        retransmits=retrans,
        segs_in=segs_in,
        segs_out=segs_out,
    )
