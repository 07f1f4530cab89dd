"""Pure: fold kernel flow snapshots into label-set counters and gauges.

The kernel's flow counters are cumulative. Each publish folds only what changed since
the previous snapshot, labelled with the identities known *now*: a reload that moves an
address to another workload changes where new counts go, never lowers a published
counter. A flow whose counters went down (its maps were recreated) starts over from 0.
Gauges (connections open now) are not folded: each publish counts them afresh, under
the identities known now.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kmeshd.events import ZERO, FlowCounters, FlowKey
from kmeshd.identity.model import IdentityView
from kmeshd.labels import LabelValues, ends_of, flow_labels


def add_unseen_closes(
    flows: Iterable[tuple[FlowKey, FlowCounters]], unseen: Mapping[FlowKey, int]
) -> list[tuple[FlowKey, FlowCounters]]:
    """Count as closed the connections the sweep found closed while no probe ran."""
    out = []
    for key, counts in flows:
        n = unseen.get(key, 0)
        out.append((key, dataclasses.replace(counts, closed=counts.closed + n) if n else counts))
    return out


@dataclass
class Aggregate:
    """Label-set totals plus the flow snapshot they were folded from."""

    workload: dict[LabelValues, FlowCounters] = field(default_factory=dict)
    service: dict[LabelValues, FlowCounters] = field(default_factory=dict)
    active_workload: dict[LabelValues, int] = field(default_factory=dict)
    active_service: dict[LabelValues, int] = field(default_factory=dict)
    unattributed: int = 0  # connections (opened or failed) with no known end
    last: dict[FlowKey, FlowCounters] = field(default_factory=dict)

    def fold(
        self,
        flows: Iterable[tuple[FlowKey, FlowCounters]],
        ids: IdentityView,
        security_policy: str = "unknown",
    ) -> None:
        seen: dict[FlowKey, FlowCounters] = {}
        self.active_workload, self.active_service = {}, {}
        for key, now in flows:
            seen[key] = now
            delta = now - self.last.get(key, ZERO)
            if delta.any_negative():
                delta = now
            if delta.is_zero() and not now.active:
                continue
            labels = self._labels(key, ids, security_policy)
            if labels is None:
                self.unattributed += delta.opened + delta.failed
                continue
            workload, service = labels
            if not delta.is_zero():
                self.workload[workload] = self.workload.get(workload, ZERO) + delta
                self.service[service] = self.service.get(service, ZERO) + delta
            if now.active:
                self.active_workload[workload] = self.active_workload.get(workload, 0) + now.active
                self.active_service[service] = self.active_service.get(service, 0) + now.active
        self.last = seen

    @staticmethod
    def _labels(
        key: FlowKey, ids: IdentityView, policy: str
    ) -> tuple[LabelValues, LabelValues] | None:
        ends = ends_of(ids, key.client, key.server, key.server_port)
        if not ends.known():
            return None
        return flow_labels(key, ends, policy)
