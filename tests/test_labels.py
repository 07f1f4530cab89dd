"""Label sets: known and unknown ends, service via VIP, via target port, none."""

from __future__ import annotations

import ipaddress

import pytest

from kmeshd.events import FlowKey
from kmeshd.identity.model import Identities, Service, ServicePort, Workload
from kmeshd.kernel.layout import Direction
from kmeshd.labels import SERVICE_LABELS, WORKLOAD_LABELS, ends_of, flow_labels

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
    """Workload and service label lists are the documented ones, in their order."""
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
    ends = ends_of(IDS, key.client, key.server, key.server_port)
    assert flow_labels(key, ends) == (workload, service)


def test_neither_end_known_is_unattributed() -> None:
    """A flow between two unknown addresses resolves to nothing."""
    assert not ends_of(IDS, ip("192.0.2.1"), ip("192.0.2.2"), 80).known()


def test_security_policy_is_configurable() -> None:
    """connection_security_policy carries the configured value."""
    key = FlowKey(ip("10.244.0.17"), ip("10.244.0.11"), 80, Direction.OUTBOUND)
    workload, _ = flow_labels(key, ends_of(IDS, key.client, key.server, 80), "mutual_tls")
    assert workload[-1] == "mutual_tls"
