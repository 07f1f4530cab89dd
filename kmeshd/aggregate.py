"""Pure: fold kernel flow snapshots into label-set counters.

The kernel's flow counters are cumulative. Each publish folds only what changed since
the previous snapshot, labelled with the identities known *now*: a reload that moves an
address to another workload changes where new counts go, never lowers a published
counter. A flow whose counters went down (its maps were recreated) starts over from 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kmeshd.events import ZERO, FlowCounters, FlowKey
from kmeshd.identity.model import IdentityView
from kmeshd.labels import LabelValues, flow_labels, resolve


@dataclass
class Aggregate:
    """Label-set totals plus the flow snapshot they were folded from."""

    workload: dict[LabelValues, FlowCounters] = field(default_factory=dict)
    service: dict[LabelValues, FlowCounters] = field(default_factory=dict)
    unattributed: int = 0  # connections (opened or failed) with no known end
    last: dict[FlowKey, FlowCounters] = field(default_factory=dict)

    def fold(
        self,
        flows: Iterable[tuple[FlowKey, FlowCounters]],
        ids: IdentityView,
        security_policy: str = "unknown",
    ) -> None:
        seen: dict[FlowKey, FlowCounters] = {}
        for key, now in flows:
            seen[key] = now
            delta = now - self.last.get(key, ZERO)
            if delta.any_negative():
                delta = now
            if not delta.is_zero():
                self._add(key, delta, ids, security_policy)
        self.last = seen

    def _add(self, key: FlowKey, delta: FlowCounters, ids: IdentityView, policy: str) -> None:
        ends = resolve(ids, key.client, key.server, key.server_port)
        if not ends.known():
            self.unattributed += delta.opened + delta.failed
            return
        workload, service = flow_labels(key, ends, policy)
        self.workload[workload] = self.workload.get(workload, ZERO) + delta
        self.service[service] = self.service.get(service, ZERO) + delta
