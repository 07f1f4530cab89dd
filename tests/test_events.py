"""Decoding kernel bytes: addresses and counts decode exactly (the mirrors themselves are
held to the C header in test_layout)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from kmeshd.events import (
    BadRecord,
    FlowKey,
    decode_address,
    decode_record,
    encode_address,
)
from kmeshd.kernel.layout import BUCKETS, CONN_RECORD, Direction, Kind, Reason
from tests.flow_counters import FlowCounters, decode_flow

SLOTS = 10 + 4 * (BUCKETS + 1)  # struct flow_counters in __u64s
ip = ipaddress.ip_address


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
    padded = (*counts, *[0] * (SLOTS - len(counts)))
    return key, struct.pack(f"<{SLOTS}Q", *padded)


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
        (  # every field in its place: the scalars, then four histograms of 18 slots + sum
            v4mapped("10.0.0.1"),
            v4mapped("10.0.0.2"),
            80,
            1,
            (5, 4, 3, 2000, 100, 1, 2, 1, 9, 7)
            + (0, 0, 3)
            + (0,) * 15
            + (12_000,)  # duration: 3 in (1 ms, 5 ms]
            + (0,) * 9
            + (2,)
            + (0,) * 8
            + (80_000,)  # srtt: 2 in (25 ms, 50 ms]
            + (1,)
            + (0,) * 17
            + (40,)  # min rtt: 1 at or below 50 µs
            + (0,) * 17
            + (4,)
            + (60_000_000,),  # connect: 4 above 10 s
            (
                FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), 80, Direction.OUTBOUND),
                FlowCounters(
                    5,
                    4,
                    3,
                    2000,
                    100,
                    reset=1,
                    refused=2,
                    timeout=1,
                    retransmits=9,
                    lost=7,
                    duration=(0, 0, 3, *[0] * 15, 12_000),
                    srtt=(*[0] * 9, 2, *[0] * 8, 80_000),
                    min_rtt=(1, *[0] * 17, 40),
                    connect=(*[0] * 17, 4, 60_000_000),
                ),
            ),
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
    """A struct conn_record: the fields given, zeros for the rest."""
    values = {name: bytes(16) if code == "16s" else 0 for name, code in CONN_RECORD.fields}
    return CONN_RECORD.codec.pack(*(values | f).values())


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
                segs_in=7,
                segs_out=6,
            ),
        ),
        (  # a long transfer: every 64-bit field past 32 bits, the largest values included
            dict(
                time_ns=2**64 - 1,
                duration_ns=86_400 * 10**9,
                received_bytes=5_000_000_001,
                sent_bytes=2**64 - 1,
                local=v4mapped("10.0.0.1"),
                remote=v4mapped("10.0.0.2"),
                kind=1,
                direction=1,
                segs_in=2**32 - 1,
                segs_out=4_000_000_000,
            ),
            dict(
                time_ns=2**64 - 1,
                duration_ns=86_400_000_000_000,
                received_bytes=5_000_000_001,
                sent_bytes=18_446_744_073_709_551_615,
                segs_in=4_294_967_295,
                segs_out=4_000_000_000,
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


GOOD = dict(kind=1, direction=2)  # the least a record needs to be one


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "0 bytes, not the 96 of struct conn_record"),
        (record_bytes(**GOOD)[:95], "95 bytes, not the 96 of struct conn_record"),
        (record_bytes(**GOOD) + b"\0", "97 bytes, not the 96 of struct conn_record"),
        (record_bytes(**GOOD) * 2, "192 bytes, not the 96 of struct conn_record"),
        (record_bytes(kind=0, direction=2), "unknown kind 0"),
        (record_bytes(kind=4, direction=2), "unknown kind 4"),
        (record_bytes(kind=1, direction=0), "unknown direction 0"),
        (record_bytes(kind=1, direction=255), "unknown direction 255"),
        (record_bytes(**GOOD, reason=4), "unknown reason 4"),
    ],
)
def test_bad_records_are_rejected(raw: bytes, problem: str) -> None:
    """A record of the wrong size or with a value this version does not know is a
    BadRecord saying which, never a struct.error, a KeyError or a half-decoded record."""
    with pytest.raises(BadRecord) as caught:
        decode_record(raw)
    assert str(caught.value) == problem


def test_counter_arithmetic() -> None:
    """Deltas subtract field by field, histogram slots included, and flag a counter that
    went down."""
    hist = (1, *[0] * 17, 30)
    a = FlowCounters(3, 2, 1, 300, 30, retransmits=4, srtt=(2, *[0] * 17, 70))
    b = FlowCounters(1, 1, 1, 100, 10, retransmits=1, srtt=hist)
    assert a - b == FlowCounters(2, 1, 0, 200, 20, retransmits=3, srtt=(1, *[0] * 17, 40))
    assert b + (a - b) == a
    assert (b - a).any_negative()
    assert (a - a).is_zero()
