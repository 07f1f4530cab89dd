"""Label sets and access records: known and unknown ends, service via VIP, via target port, none."""

from __future__ import annotations

import ipaddress

import pytest

from kmeshd.events import ConnectionRecord, FlowKey
from kmeshd.identity.model import Identities, Service, ServicePort, Workload
from kmeshd.kernel.layout import Direction, Kind, Reason
from kmeshd.labels import (
    SERVICE_LABELS,
    WORKLOAD_LABELS,
    access_record,
    flow_labels,
    format_address,
    resolve,
)

ip = ipaddress.ip_address

SLEEP = Workload(
    "sleep-7c8f6b9d4-x2x7q",
    "sleep",
    "default",
    "sleep",
    "latest",
    "-",
    "Kubernetes",
    (ip("10.244.0.17"), ip("fd00::17")),
)
HTTPBIN = Workload(
    "httpbin-5c5944c58c-v9mlk",
    "httpbin",
    "default",
    "httpbin",
    "v1",
    "spiffe://cluster.local/ns/default/sa/httpbin",
    "Kubernetes",
    (ip("10.244.0.11"), ip("fd00::11")),
)
SVC = Service(
    "httpbin",
    "default",
    "httpbin.default.svc.cluster.local",
    (ip("10.96.0.20"),),
    (ServicePort(8000, 80),),
    ("httpbin",),
)
IDS = Identities((SLEEP, HTTPBIN), (SVC,))

SLEEP_SRC = ("sleep", "sleep", "latest", "default", "-", "sleep", "latest", "Kubernetes")
HTTPBIN_DST = (
    "httpbin",
    "httpbin",
    "v1",
    "default",
    "spiffe://cluster.local/ns/default/sa/httpbin",
    "httpbin",
    "v1",
    "Kubernetes",
)
UNKNOWN8 = ("-",) * 8
TAIL = ("tcp", "-", "unknown")
SVC3 = ("httpbin.default.svc.cluster.local", "default", "httpbin")


def test_label_names_follow_the_contract_order() -> None:
    """Workload and service label lists are INTERFACE.md's, in its order."""
    assert WORKLOAD_LABELS[:9] == SERVICE_LABELS[:9]
    assert WORKLOAD_LABELS[9:12] == (
        "destination_pod_address",
        "destination_pod_namespace",
        "destination_pod_name",
    )
    assert SERVICE_LABELS[9:12] == (
        "destination_service",
        "destination_service_namespace",
        "destination_service_name",
    )
    assert WORKLOAD_LABELS[12:] == SERVICE_LABELS[12:]
    assert len(WORKLOAD_LABELS) == 23 and WORKLOAD_LABELS[-1] == "connection_security_policy"


@pytest.mark.parametrize(
    ("key", "workload", "service"),
    [
        pytest.param(
            FlowKey(ip("10.244.0.17"), ip("10.244.0.11"), 80, Direction.INBOUND),
            (
                "destination",
                *SLEEP_SRC,
                "10.244.0.11",
                "default",
                HTTPBIN.name,
                *HTTPBIN_DST,
                *TAIL,
            ),
            ("destination", *SLEEP_SRC, *SVC3, *HTTPBIN_DST, *TAIL),
            id="both-known-service-via-target-port",
        ),
        pytest.param(
            FlowKey(ip("10.244.0.17"), ip("10.244.0.11"), 9090, Direction.OUTBOUND),
            ("source", *SLEEP_SRC, "10.244.0.11", "default", HTTPBIN.name, *HTTPBIN_DST, *TAIL),
            ("source", *SLEEP_SRC, "-", "-", "-", *HTTPBIN_DST, *TAIL),
            id="no-service-on-that-port",
        ),
        pytest.param(
            FlowKey(ip("10.244.0.17"), ip("10.96.0.20"), 8000, Direction.OUTBOUND),
            ("source", *SLEEP_SRC, "-", "-", "-", *UNKNOWN8, *TAIL),
            ("source", *SLEEP_SRC, *SVC3, *UNKNOWN8, *TAIL),
            id="client-to-service-vip",
        ),
        pytest.param(
            FlowKey(ip("192.0.2.9"), ip("fd00::11"), 80, Direction.INBOUND),
            ("destination", *UNKNOWN8, "fd00::11", "default", HTTPBIN.name, *HTTPBIN_DST, *TAIL),
            ("destination", *UNKNOWN8, *SVC3, *HTTPBIN_DST, *TAIL),
            id="unknown-source-ipv6-destination",
        ),
        pytest.param(
            FlowKey(ip("10.244.0.17"), ip("198.51.100.7"), 443, Direction.OUTBOUND),
            ("source", *SLEEP_SRC, "-", "-", "-", *UNKNOWN8, *TAIL),
            ("source", *SLEEP_SRC, "-", "-", "-", *UNKNOWN8, *TAIL),
            id="unknown-destination",
        ),
    ],
)
def test_flow_labels(key: FlowKey, workload: tuple[str, ...], service: tuple[str, ...]) -> None:
    """Each flow gets exactly these workload- and service-level label values."""
    ends = resolve(IDS, key.client, key.server, key.server_port)
    assert flow_labels(key, ends) == (workload, service)


def test_neither_end_known_is_unattributed() -> None:
    """A flow between two unknown addresses resolves to nothing."""
    assert not resolve(IDS, ip("192.0.2.1"), ip("192.0.2.2"), 80).known()


def test_security_policy_is_configurable() -> None:
    """connection_security_policy carries the configured value."""
    key = FlowKey(ip("10.244.0.17"), ip("10.244.0.11"), 80, Direction.OUTBOUND)
    workload, _ = flow_labels(key, resolve(IDS, key.client, key.server, 80), "mutual_tls")
    assert workload[-1] == "mutual_tls"


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
