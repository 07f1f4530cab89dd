"""Decoding kernel bytes: ctypes mirrors match the C header, addresses and counts decode exactly."""

from __future__ import annotations

import ctypes
import ipaddress
import re
import struct
from pathlib import Path

import pytest

from kmeshd.events import (
    ConnRecordStruct,
    Direction,
    FlowCounters,
    FlowCountersStruct,
    FlowKey,
    FlowKeyStruct,
    Kind,
    Reason,
    decode_address,
    decode_flow,
    decode_record,
    encode_address,
)

HEADER = Path(__file__).parent.parent / "bpf" / "tcp_probe.h"
ip = ipaddress.ip_address


def header_sizes() -> dict[str, int]:
    text = HEADER.read_text()
    return {m[0]: int(m[1]) for m in re.findall(r"sizeof\(struct (\w+)\) == (\d+)", text)}


@pytest.mark.parametrize(
    ("struct_name", "mirror"),
    [
        ("flow_key", FlowKeyStruct),
        ("flow_counters", FlowCountersStruct),
        ("conn_record", ConnRecordStruct),
    ],
)
def test_ctypes_mirror_has_the_size_the_header_asserts(struct_name: str, mirror: type) -> None:
    """Each ctypes mirror is exactly as large as its C struct."""
    assert ctypes.sizeof(mirror) == header_sizes()[struct_name]


def test_layout_constant_matches_header() -> None:
    """The Python layout version is the header's KMESHD_LAYOUT."""
    from kmeshd.events import LAYOUT

    assert f"#define KMESHD_LAYOUT {LAYOUT}\n" in HEADER.read_text()


def v4mapped(a: str) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + ip(a).packed


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (v4mapped("10.244.0.11"), ip("10.244.0.11")),
        (v4mapped("0.0.0.0"), ip("0.0.0.0")),
        (ip("fd00::11").packed, ip("fd00::11")),
        (ip("::1").packed, ip("::1")),
        (ip("::ffff:127.0.0.1").packed, ip("127.0.0.1")),
        (b"\0" * 16, ip("::")),
    ],
)
def test_decode_address(raw: bytes, expected: object) -> None:
    """16 kernel bytes decode to an address; v4-mapped ones to plain IPv4."""
    assert decode_address(raw) == expected


@pytest.mark.parametrize("a", ["10.244.0.11", "fd00::11", "::1", "0.0.0.0"])
def test_encode_address_round_trips(a: str) -> None:
    """encode_address is decode_address's inverse."""
    assert decode_address(encode_address(ip(a))) == ip(a)


def flow_bytes(
    client: bytes, server: bytes, port: int, direction: int, counts: tuple[int, ...]
) -> tuple[bytes, bytes]:
    key = client + server + struct.pack("<HBB", port, direction, 0)
    return key, struct.pack("<5Q", *counts)


@pytest.mark.parametrize(
    ("client", "server", "port", "direction", "counts", "expected"),
    [
        (
            v4mapped("10.244.0.17"),
            v4mapped("10.244.0.13"),
            9080,
            2,
            (1, 1, 0, 292, 5),
            (
                FlowKey(ip("10.244.0.17"), ip("10.244.0.13"), 9080, Direction.INBOUND),
                FlowCounters(1, 1, 0, 292, 5),
            ),
        ),
        (
            ip("fd00::17").packed,
            ip("fd00::13").packed,
            80,
            1,
            (0, 0, 3, 0, 0),
            (
                FlowKey(ip("fd00::17"), ip("fd00::13"), 80, Direction.OUTBOUND),
                FlowCounters(0, 0, 3, 0, 0),
            ),
        ),
        (
            v4mapped("10.0.0.1"),
            v4mapped("10.0.0.2"),
            65535,
            1,
            (2**64 - 1, 0, 0, 2**40, 0),
            (
                FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), 65535, Direction.OUTBOUND),
                FlowCounters(2**64 - 1, 0, 0, 2**40, 0),
            ),
        ),
        (
            v4mapped("10.0.0.1"),
            v4mapped("10.0.0.2"),
            80,
            2,
            (0, 0, 0, 0, 0),
            (FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), 80, Direction.INBOUND), FlowCounters()),
        ),
    ],
)
def test_decode_flow(
    client: bytes,
    server: bytes,
    port: int,
    direction: int,
    counts: tuple[int, ...],
    expected: object,
) -> None:
    """Flow keys and 64-bit counters decode field for field (IPv4, IPv6, zero, huge)."""
    assert decode_flow(*flow_bytes(client, server, port, direction, counts)) == expected


def record_bytes(**f: object) -> bytes:
    r = ConnRecordStruct()
    for name, v in f.items():
        if name in ("local", "remote"):
            getattr(r, name)[:] = list(v)  # type: ignore[call-overload]
        else:
            setattr(r, name, v)
    return bytes(r)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            dict(
                time_ns=5,
                duration_ns=2733902,
                received_bytes=292,
                sent_bytes=5,
                local=v4mapped("10.244.0.13"),
                remote=v4mapped("10.244.0.17"),
                local_port=9080,
                remote_port=51842,
                kind=1,
                direction=2,
                reason=0,
                flags=0,
                srtt_us=40,
                min_rtt_us=20,
                total_retrans=1,
                segs_in=7,
                segs_out=6,
            ),
            dict(
                local=ip("10.244.0.13"),
                remote=ip("10.244.0.17"),
                kind=Kind.CLOSED,
                direction=Direction.INBOUND,
                reason=Reason.NONE,
                reset=False,
                received_bytes=292,
                sent_bytes=5,
                retransmits=1,
            ),
        ),
        (
            dict(
                time_ns=9,
                duration_ns=1000,
                local=ip("fd00::17").packed,
                remote=ip("fd00::13").packed,
                local_port=40000,
                remote_port=80,
                kind=2,
                direction=1,
                reason=1,
                flags=1,
            ),
            dict(
                local=ip("fd00::17"),
                remote=ip("fd00::13"),
                kind=Kind.FAILED,
                direction=Direction.OUTBOUND,
                reason=Reason.REFUSED,
                reset=True,
                received_bytes=0,
                sent_bytes=0,
                retransmits=0,
            ),
        ),
        (
            dict(
                local=v4mapped("10.0.0.1"),
                remote=v4mapped("10.0.0.2"),
                kind=2,
                direction=1,
                reason=2,
            ),
            dict(
                kind=Kind.FAILED,
                reason=Reason.TIMEOUT,
                received_bytes=0,
                sent_bytes=0,
                duration_ns=0,
            ),
        ),
    ],
)
def test_decode_record(fields: dict[str, object], expected: dict[str, object]) -> None:
    """Ring-buffer records decode to the fields the access log needs."""
    rec = decode_record(record_bytes(**fields))
    assert {k: getattr(rec, k) for k in expected} == expected


def test_counter_arithmetic() -> None:
    """Deltas subtract field by field and flag a counter that went down."""
    a, b = FlowCounters(3, 2, 1, 300, 30), FlowCounters(1, 1, 1, 100, 10)
    assert a - b == FlowCounters(2, 1, 0, 200, 20)
    assert (b - a).any_negative()
    assert (a - a).is_zero()
