"""Folding flow snapshots: deltas only, identities as of now, never backwards."""

from __future__ import annotations

import ipaddress

from kmeshd.aggregate import Aggregate, add_unseen_closes
from kmeshd.events import FlowCounters, FlowKey
from kmeshd.identity.model import Identities, Workload
from kmeshd.kernel.layout import Direction

ip = ipaddress.ip_address
A = Workload("a-1", "a", "default", "a", "latest", "-", "Kubernetes", (ip("10.0.0.1"),))
B = Workload("b-1", "b", "default", "b", "latest", "-", "Kubernetes", (ip("10.0.0.2"),))
C = Workload("c-1", "c", "default", "c", "latest", "-", "Kubernetes", (ip("10.0.0.2"),))
KEY = FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), 80, Direction.OUTBOUND)
STRANGERS = FlowKey(ip("192.0.2.1"), ip("192.0.2.2"), 80, Direction.OUTBOUND)


def totals(agg: Aggregate, dst: str) -> FlowCounters:
    """Workload-level totals whose destination_workload is `dst` (index 12)."""
    return sum((v for k, v in agg.workload.items() if k[12] == dst), FlowCounters())


def test_fold_adds_only_what_changed() -> None:
    """Two snapshots of one cumulative flow add up to the later snapshot, not the sum."""
    agg, ids = Aggregate(), Identities((A, B))
    agg.fold([(KEY, FlowCounters(1, 1, 0, 292, 5))], ids)
    agg.fold([(KEY, FlowCounters(3, 2, 1, 600, 15))], ids)
    assert totals(agg, "b") == FlowCounters(3, 2, 1, 600, 15)
    assert agg.service  # the service level gets the same flows


def test_reload_moves_new_counts_and_keeps_old_ones() -> None:
    """After the address changes owner, old totals stay; only new counts go to the new owner."""
    agg = Aggregate()
    agg.fold([(KEY, FlowCounters(1, 1, 0, 100, 10))], Identities((A, B)))
    agg.fold([(KEY, FlowCounters(2, 2, 0, 250, 20))], Identities((A, C)))
    assert totals(agg, "b") == FlowCounters(1, 1, 0, 100, 10)
    assert totals(agg, "c") == FlowCounters(1, 1, 0, 150, 10)


def test_counters_that_went_down_start_over() -> None:
    """Recreated kernel maps (counts lower than before) add their new counts, never subtract."""
    agg, ids = Aggregate(), Identities((A, B))
    agg.fold([(KEY, FlowCounters(5, 5, 0, 500, 50))], ids)
    agg.fold([(KEY, FlowCounters(1, 1, 0, 7, 1))], ids)
    assert totals(agg, "b") == FlowCounters(6, 6, 0, 507, 51)


def test_unknown_flows_are_counted_as_unattributed_only() -> None:
    """Flows with no known end add opened + failed to unattributed and create no series."""
    agg = Aggregate()
    agg.fold([(STRANGERS, FlowCounters(2, 1, 3, 10, 10))], Identities((A, B)))
    assert agg.unattributed == 5
    assert agg.workload == {} and agg.service == {}


def test_an_empty_snapshot_changes_nothing() -> None:
    """Folding nothing leaves totals as they were."""
    agg, ids = Aggregate(), Identities((A, B))
    agg.fold([(KEY, FlowCounters(1, 1, 0, 1, 1))], ids)
    agg.fold([], ids)
    assert totals(agg, "b") == FlowCounters(1, 1, 0, 1, 1)


def active(agg: Aggregate, dst: str) -> int:
    return sum(v for k, v in agg.active_workload.items() if k[12] == dst)


def test_active_connections_are_opened_minus_closed_now() -> None:
    """The gauge is recounted each fold: 3 open, then 1, then 0 with no series left."""
    agg, ids = Aggregate(), Identities((A, B))
    agg.fold([(KEY, FlowCounters(opened=3))], ids)
    assert active(agg, "b") == 3
    agg.fold([(KEY, FlowCounters(opened=3, closed=2))], ids)
    assert active(agg, "b") == 1
    assert sum(agg.active_service.values()) == 1
    agg.fold([(KEY, FlowCounters(opened=3, closed=3))], ids)
    assert agg.active_workload == {} and agg.active_service == {}


def test_active_connections_follow_the_identities_of_now() -> None:
    """An open connection whose server address changed owner is open under the new owner,
    not left behind under the old one."""
    agg = Aggregate()
    agg.fold([(KEY, FlowCounters(opened=2, closed=1))], Identities((A, B)))
    agg.fold([(KEY, FlowCounters(opened=2, closed=1))], Identities((A, C)))
    assert active(agg, "b") == 0 and active(agg, "c") == 1


def test_unseen_closes_count_as_closed() -> None:
    """A connection the sweep found closed while no probe ran is closed: it leaves the
    gauge and enters the closed counter, and flows it does not name are untouched."""
    other = FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), 443, Direction.OUTBOUND)
    flows = add_unseen_closes(
        [(KEY, FlowCounters(opened=2, closed=1)), (other, FlowCounters(opened=1))], {KEY: 1}
    )
    assert flows == [(KEY, FlowCounters(opened=2, closed=2)), (other, FlowCounters(opened=1))]
    agg = Aggregate()
    agg.fold(flows, Identities((A, B)))
    assert active(agg, "b") == 1
    assert totals(agg, "b") == FlowCounters(opened=3, closed=2)
