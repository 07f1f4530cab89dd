"""Pure: what is known of a flow's two ends (`ends_of`), and the metric label sets it gets.

Label names and their order are the families' documented labels (kmeshd(8), METRICS);
an unknown value is UNKNOWN ("-").
"""

from __future__ import annotations

from typing import NamedTuple

from kmeshd.events import FlowKey
from kmeshd.identity.model import UNKNOWN, IdentityView, IPAddress, Service, Workload
from kmeshd.kernel.layout import Direction

SOURCE_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
)
DESTINATION_LABELS = (
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
WORKLOAD_LABELS = (
    *SOURCE_LABELS,
    "destination_pod_address",
    "destination_pod_namespace",
    "destination_pod_name",
    *DESTINATION_LABELS,
)
SERVICE_LABELS = (
    *SOURCE_LABELS,
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    *DESTINATION_LABELS,
)

LabelValues = tuple[str, ...]


class Ends(NamedTuple):
    """What is known about both ends of one flow. A tuple, not a frozen dataclass: one is
    made per flow and record, and a frozen dataclass takes three times as long to make."""

    source: Workload | None
    destination: Workload | None
    service: Service | None

    def known(self) -> bool:
        return self.source is not None or self.destination is not None or self.service is not None


def ends_of(ids: IdentityView, client: IPAddress, server: IPAddress, port: int) -> Ends:
    """A peer that is a service VIP names the service (the client's socket sees the VIP:
    NAT happens below it); else the service forwarding to that address and target port.
    A pod's address is never a VIP, so for a pod the VIP lookup is skipped (lookups are
    what an event costs at cluster scale)."""
    destination = ids.workload_at(server)
    if destination is not None:
        service = ids.service_behind(server, port)
    else:
        service = ids.service_at(server, port) or ids.service_behind(server, port)
    return Ends(ids.workload_at(client), destination, service)


def _workload_labels(w: Workload | None) -> LabelValues:
    """workload, canonical service/revision, namespace, principal, app, version, cluster."""
    return (UNKNOWN,) * 8 if w is None else w.label_values()


def _reporter(direction: Direction) -> str:
    return "destination" if direction is Direction.INBOUND else "source"


def _pod_labels(w: Workload | None, server: IPAddress) -> LabelValues:
    if w is None:
        return (UNKNOWN,) * 3
    return (str(server), w.namespace, w.name)


def _service_labels(s: Service | None) -> LabelValues:
    if s is None:
        return (UNKNOWN,) * 3
    return (s.hostname, s.namespace, s.name)


def flow_labels(
    key: FlowKey, ends: Ends, security_policy: str = "unknown"
) -> tuple[LabelValues, LabelValues]:
    """(workload-level, service-level) label values for one flow, in contract order."""
    head = (_reporter(key.direction), *_workload_labels(ends.source))
    tail = (*_workload_labels(ends.destination), "tcp", UNKNOWN, security_policy)
    return (
        (*head, *_pod_labels(ends.destination, key.server), *tail),
        (*head, *_service_labels(ends.service), *tail),
    )
