"""From a kernel record to the access record: both ends and the service named, addresses
formatted, unknown ends "-"."""

from __future__ import annotations

import ipaddress

import pytest

from kmeshd.accesslog.records import DRAIN_SLICE_S, RecordFeed, access_record, format_address
from kmeshd.accesslog.render import AccessRecord
from kmeshd.accesslog.sinks import Fanout
from kmeshd.events import ConnectionRecord
from kmeshd.kernel.layout import Direction, Kind, Reason
from tests.fakes import conn_record
from tests.test_labels import HTTPBIN, IDS, SLEEP, SVC

ip = ipaddress.ip_address


@pytest.mark.parametrize(
    ("addr", "port", "text"),
    [(ip("10.244.0.17"), 51842, "10.244.0.17:51842"), (ip("fd00::11"), 80, "[fd00::11]:80")],
)
def test_format_address(addr: object, port: int, text: str) -> None:
    """IPv4 prints host:port, IPv6 [host]:port."""
    assert format_address(addr, port) == text  # type: ignore[arg-type]


def record(
    direction: Direction, kind: Kind = Kind.CLOSED, reason: Reason = Reason.NONE, **kw: object
) -> ConnectionRecord:
    base: dict[str, object] = dict(
        time_ns=1_000,
        duration_ns=2_733_902,
        received_bytes=292,
        sent_bytes=5,
        local=ip("10.244.0.11"),
        local_port=80,
        remote=ip("10.244.0.17"),
        remote_port=51842,
        kind=kind,
        direction=direction,
        reason=reason,
        reset=False,
        srtt_us=40,
        min_rtt_us=20,
        retransmits=0,
        segs_in=5,
        segs_out=4,
    )
    base.update(kw)
    return ConnectionRecord(**base)  # type: ignore[arg-type]


def test_inbound_record_names_the_remote_as_source() -> None:
    """An accepted socket's record: src is the peer, dst this socket; identities attached."""
    r = access_record(record(Direction.INBOUND), IDS, wall_offset_ns=1_726_301_966_552_708_932)
    assert (r.src_addr, r.src_workload, r.src_namespace) == (
        "10.244.0.17:51842",
        SLEEP.name,
        "default",
    )
    assert (r.dst_addr, r.dst_workload, r.dst_namespace) == (
        "10.244.0.11:80",
        HTTPBIN.name,
        "default",
    )
    assert r.dst_service == "httpbin.default.svc.cluster.local"
    assert (r.direction, r.sent_bytes, r.received_bytes) == ("INBOUND", 5, 292)
    assert r.time_ns == 1_726_301_966_552_709_932 and r.failure_reason is None
    assert (r.srtt_us, r.min_rtt_us, r.retransmits, r.segs_in, r.segs_out) == (40, 20, 0, 5, 4)


def test_outbound_failed_record_to_vip() -> None:
    """A failed connect to a service VIP: service from the VIP, workload unknown, reason kept."""
    rec = record(
        Direction.OUTBOUND,
        Kind.FAILED,
        Reason.TIMEOUT,
        local=ip("10.244.0.17"),
        local_port=40000,
        remote=ip("10.96.0.20"),
        remote_port=8000,
        received_bytes=0,
        sent_bytes=0,
    )
    r = access_record(rec, IDS, 0)
    assert (r.src_workload, r.dst_addr, r.dst_service) == (
        SLEEP.name,
        "10.96.0.20:8000",
        SVC.hostname,
    )
    assert (r.dst_workload, r.dst_namespace, r.failure_reason) == ("-", "-", "timeout")


def test_unknown_ends_are_dashes() -> None:
    """Nothing known: every identity field is "-"."""
    rec = record(Direction.OUTBOUND, local=ip("192.0.2.1"), remote=ip("fd00::99"), remote_port=443)
    r = access_record(rec, IDS, 0)
    assert (r.src_workload, r.src_namespace, r.dst_workload, r.dst_namespace, r.dst_service) == (
        "-",
    ) * 5
    assert r.dst_addr == "[fd00::99]:443"


class Collecting:
    """A sink that keeps what it is given."""

    name, up, dropped = "collect", True, 0

    def __init__(self) -> None:
        self.got: list[AccessRecord] = []

    def write(self, r: AccessRecord) -> bool:
        self.got.append(r)
        return True

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_feed_stops_the_drain_when_the_budget_is_spent() -> None:
    """With max_rate 2 the probe is told to stop at the second record of a second; every
    record handed over is written and counted."""
    now = [0.0]
    sink = Collecting()
    feed = RecordFeed(Fanout([sink]), IDS, 2, lambda: now[0])
    raw = conn_record("10.244.0.17", 40000, "10.244.0.11", 80, Direction.OUTBOUND)
    assert feed.begin()
    assert [feed(raw), feed(raw)] == [True, False]
    assert not feed.begin()
    now[0] = 1.0
    assert feed.begin()
    feed.limit(0)
    assert all(feed(raw) for _ in range(100))
    assert feed.handled == 102 and len(sink.got) == 102
    assert (sink.got[0].src_workload, sink.got[0].dst_workload) == (SLEEP.name, HTTPBIN.name)


def test_one_drain_stops_after_its_time_slice_even_without_a_limit() -> None:
    """With no rate limit, a drain still ends after DRAIN_SLICE_S, so that the main loop
    goes on publishing during a flood; begin(None) (shutdown's) drains to the end."""
    now = [0.0]
    feed = RecordFeed(Fanout([Collecting()]), IDS, 0, lambda: now[0])
    raw = conn_record("10.244.0.17", 40000, "10.244.0.11", 80, Direction.OUTBOUND)
    assert feed.begin()
    assert feed(raw)
    now[0] += DRAIN_SLICE_S
    assert not feed(raw)
    assert feed.begin(None)
    now[0] += 3600
    assert feed(raw)
