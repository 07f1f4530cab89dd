"""Folding kernel flow entries into label sets: deltas only, identities as of now, never
backwards; open connections counted afresh; bounded by a cap and an expiry."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from kmeshd.aggregate import OVERFLOW, LabelSet, Ledger, Slots, names_of, overflow_labels
from kmeshd.events import FlowKey, encode_address
from kmeshd.identity.model import Identities, Workload
from kmeshd.kernel.layout import FLOW_COUNTERS, FLOW_KEY, Direction, Entries
from tests.flow_counters import FlowCounters

ip = ipaddress.ip_address
A = Workload("a-1", "a", "default", "a", "latest", "-", "Kubernetes", (ip("10.0.0.1"),))
B = Workload("b-1", "b", "default", "b", "latest", "-", "Kubernetes", (ip("10.0.0.2"),))
C = Workload("c-1", "c", "default", "c", "latest", "-", "Kubernetes", (ip("10.0.0.2"),))
KEY = FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), 80, Direction.OUTBOUND)
STRANGERS = FlowKey(ip("192.0.2.1"), ip("192.0.2.2"), 80, Direction.OUTBOUND)


def raw_key(key: FlowKey, generation: int = 0) -> bytes:
    client, server = encode_address(key.client), encode_address(key.server)
    return FLOW_KEY.codec.pack(client, server, key.server_port, key.direction, generation)


def entries(flows: Sequence[tuple[FlowKey, FlowCounters]], generation: int = 0) -> Entries:
    """The kernel map holding these flows, as a batch read hands it over."""
    keys = b"".join(raw_key(k, generation) for k, _ in flows)
    values = b"".join(FLOW_COUNTERS.codec.pack(*c.vector()) for _, c in flows)
    return Entries(keys, values, len(flows))


def fold(ledger: Ledger, flows: Sequence[tuple[FlowKey, FlowCounters]], ids: Identities) -> None:
    ledger.fold(entries(flows), ids, 0.0)


def totals(agg: Ledger, dst: str) -> FlowCounters:
    """Workload-level totals whose destination_workload is `dst` (index 12)."""
    found = [s.counts for k, s in agg.workload.items() if k[12] == dst]
    summed = [sum(column) for column in zip(*found, strict=True)] if found else [0] * 10
    return FlowCounters(*summed[:10])


def test_fold_adds_only_what_changed() -> None:
    """Two snapshots of one cumulative flow add up to the later snapshot, not the sum."""
    agg, ids = Ledger(), Identities((A, B))
    fold(agg, [(KEY, FlowCounters(1, 1, 0, 292, 5))], ids)
    fold(agg, [(KEY, FlowCounters(3, 2, 1, 600, 15))], ids)
    assert totals(agg, "b") == FlowCounters(3, 2, 1, 600, 15)
    assert agg.service  # the service level gets the same flows


def test_reload_moves_new_counts_and_keeps_old_ones() -> None:
    """After the address changes owner, old totals stay; only new counts go to the new owner."""
    agg = Ledger()
    fold(agg, [(KEY, FlowCounters(1, 1, 0, 100, 10))], Identities((A, B)))
    fold(agg, [(KEY, FlowCounters(2, 2, 0, 250, 20))], Identities((A, C)))
    assert totals(agg, "b") == FlowCounters(1, 1, 0, 100, 10)
    assert totals(agg, "c") == FlowCounters(1, 1, 0, 150, 10)


def test_counters_that_went_down_start_over() -> None:
    """Recreated kernel maps (counts lower than before) add their new counts, never subtract."""
    agg, ids = Ledger(), Identities((A, B))
    fold(agg, [(KEY, FlowCounters(5, 5, 0, 500, 50))], ids)
    fold(agg, [(KEY, FlowCounters(1, 1, 0, 7, 1))], ids)
    assert totals(agg, "b") == FlowCounters(6, 6, 0, 507, 51)


def test_unknown_flows_are_counted_as_unattributed_only() -> None:
    """Flows with no known end add opened + failed to unattributed and create no series."""
    agg = Ledger()
    fold(agg, [(STRANGERS, FlowCounters(2, 1, 3, 10, 10))], Identities((A, B)))
    assert agg.unattributed == 5
    assert agg.workload == {} and agg.service == {}


def test_an_empty_snapshot_changes_nothing() -> None:
    """Folding nothing leaves totals as they were."""
    agg, ids = Ledger(), Identities((A, B))
    fold(agg, [(KEY, FlowCounters(1, 1, 0, 1, 1))], ids)
    fold(agg, [], ids)
    assert totals(agg, "b") == FlowCounters(1, 1, 0, 1, 1)


def test_generations_of_one_flow_add_up_and_a_retired_one_is_forgotten() -> None:
    """A flow counted in two generations is the sum of both; once the old one's final
    counts are folded and it is forgotten, the new one goes on from its own counts."""
    agg, ids = Ledger(), Identities((A, B))
    old = [(KEY, FlowCounters(2, 2, 0, 200, 20))]
    agg.fold(entries(old, generation=0), ids, 0.0)
    both = Entries(
        entries(old, 0).keys + raw_key(KEY, 1),
        entries(old, 0).values + FLOW_COUNTERS.codec.pack(*FlowCounters(1, 0, 0, 50, 0).vector()),
        2,
    )
    agg.fold(both, ids, 1.0)
    agg.forget([raw_key(KEY, 0)])
    agg.fold(entries([(KEY, FlowCounters(1, 1, 0, 80, 8))], generation=1), ids, 2.0)
    assert totals(agg, "b") == FlowCounters(3, 3, 0, 280, 28)
    assert agg.entries == 1


def active(agg: Ledger, dst: str) -> int:
    return sum(s.active for k, s in agg.workload.items() if k[12] == dst)


def test_active_connections_are_the_sockets_open_now() -> None:
    """The gauge is recounted at each publish from the kernel's established sockets: 3
    open, then 1, then 0."""
    agg, ids = Ledger(), Identities((A, B))
    fold(agg, [(KEY, FlowCounters(opened=3))], ids)
    agg.count_open({raw_key(KEY): 3}, ids, 0.0)
    assert active(agg, "b") == 3
    agg.count_open({raw_key(KEY): 1}, ids, 0.0)
    assert active(agg, "b") == 1
    assert sum(s.active for s in agg.service.values()) == 1
    agg.count_open({}, ids, 0.0)
    assert active(agg, "b") == 0


def test_active_connections_follow_the_identities_of_now() -> None:
    """An open connection whose server address changed owner is open under the new owner,
    not left behind under the old one."""
    agg = Ledger()
    fold(agg, [(KEY, FlowCounters(opened=2, closed=1))], Identities((A, B)))
    agg.count_open({raw_key(KEY): 1}, Identities((A, B)), 0.0)
    agg.count_open({raw_key(KEY): 1}, Identities((A, C)), 0.0)
    assert active(agg, "b") == 0 and active(agg, "c") == 1


def test_unseen_closes_count_as_closed() -> None:
    """A connection the sweep found closed while no probe ran is closed: it enters the
    closed counter of its flow's label sets, and flows it does not name are untouched."""
    other = FlowKey(ip("10.0.0.1"), ip("10.0.0.2"), 443, Direction.OUTBOUND)
    agg, ids = Ledger(), Identities((A, B))
    fold(agg, [(KEY, FlowCounters(opened=2, closed=1)), (other, FlowCounters(opened=1))], ids)
    agg.fold_closes([(raw_key(KEY), 1)], ids, 0.0)
    assert totals(agg, "b") == FlowCounters(opened=3, closed=2)


def many_clients(n: int) -> tuple[Identities, list[tuple[FlowKey, FlowCounters]]]:
    """`n` client workloads, each with one connection to B."""
    clients = [
        Workload(f"w{i}-1", f"w{i}", "default", f"w{i}", "latest", "-", "Kubernetes",
                 (ip(f"10.1.{i // 250}.{i % 250 + 1}"),))
        for i in range(n)
    ]  # fmt: skip
    flows = [
        (FlowKey(w.addresses[0], ip("10.0.0.2"), 80, Direction.OUTBOUND), FlowCounters(1, 1))
        for w in clients
    ]
    return Identities((*clients, B)), flows


def test_past_the_cap_new_label_sets_fold_into_the_overflow_label_set() -> None:
    """max_series + 100 label sets: the first max_series are their own, exactly 100 fold
    into one overflow label set per level, which keeps the reporter and says "overflow"
    for every identity, and no count is lost."""
    ids, flows = many_clients(150)
    agg = Ledger(max_series=50)
    fold(agg, flows, ids)
    for level in ("workload", "service"):
        series = agg.levels[level]
        assert len(series) == 51
        assert agg.overflowed[level] == 100
        [overflow] = [labels for labels in series if labels[1] == OVERFLOW]
        assert overflow[0] == "source" and overflow[-3:] == ("tcp", "-", "unknown")
        assert set(overflow[1:20]) == {OVERFLOW}
        assert series[overflow].counts[0] == 100
        assert sum(s.counts[0] for s in series.values()) == 150
    fold(agg, flows, ids)  # nothing new: nothing counted again
    assert agg.overflowed == {"workload": 100, "service": 100}


def test_label_sets_of_gone_identities_leave_after_the_ttl() -> None:
    """A label set naming a workload no longer known leaves once idle for series_ttl with
    no open connection; label sets of known identities stay however idle."""
    ids, flows = many_clients(2)
    agg = Ledger(series_ttl=60.0)
    agg.fold(entries(flows), ids, 0.0)
    gone = Identities(tuple(w for w in ids.workloads if w.workload != "w0"))
    assert agg.expire(gone, 59.0) == 0  # not idle long enough
    w0 = [s for lv in agg.levels.values() for labels, s in lv.items() if labels[1] == "w0"]
    for series in w0:
        series.active = 1  # still open (as counted under identities that knew w0)
    assert agg.expire(gone, 60.0) == 0
    for series in w0:
        series.active = 0
    assert agg.expire(gone, 60.0) == 2  # w0's label set, at both levels
    assert {labels[1] for labels in agg.workload} == {"w1"}
    assert agg.expire(gone, 10_000.0) == 0  # w1 is known: it stays
    assert agg.expired == 2


@pytest.mark.parametrize(
    ("level", "labels", "names"),
    [
        (
            "workload",
            ("source", *["a"] * 8, "10.0.0.2", "ns", "b-1", *["b"] * 8, "tcp", "-", "unknown"),
            [("workload", *["a"] * 8), ("workload", *["b"] * 8), ("pod", "ns", "b-1")],
        ),
        (
            "service",
            ("source", *["-"] * 8, "b.ns.svc", "ns", "b", *["-"] * 8, "tcp", "-", "unknown"),
            [("service", "ns", "b")],
        ),
        ("workload", ("source", *["-"] * 19, "tcp", "-", "unknown"), []),
    ],
)
def test_the_identities_a_label_set_names(
    level: str, labels: tuple[str, ...], names: list[tuple[str, ...]]
) -> None:
    assert names_of(labels, level) == names


def test_overflow_keeps_reporter_and_policy() -> None:
    labels = ("destination", *["x"] * 19, "tcp", "-", "mutual_tls")
    assert overflow_labels(labels) == ("destination", *[OVERFLOW] * 19, "tcp", "-", "mutual_tls")


def test_only_the_histograms_asked_for_are_kept() -> None:
    """Slots keep the ten scalars, then each selected histogram's 19 slots."""
    counts = FlowCounters(1, srtt=(1, *[0] * 17, 40), connect=(*[0] * 17, 1, 9))
    agg, ids = Ledger(Slots(("connect", "srtt"))), Identities((A, B))
    fold(agg, [(KEY, counts)], ids)
    [series] = agg.workload.values()
    assert series.counts == [1, *[0] * 9, 1, *[0] * 17, 40, *[0] * 17, 1, 9]
    assert isinstance(series, LabelSet)


def test_a_pod_relabelled_in_the_cache_takes_the_new_counts() -> None:
    """The Kubernetes cache changes in place: a flow's counts after a pod's labels changed
    go to its new label set (kept routes are checked against the cache's version)."""
    from dataclasses import replace

    from kmeshd.identity.cache import APISERVER, PODS, IdentityCache
    from kmeshd.identity.objects import Pod

    cache = IdentityCache("n1")
    client, server = (Pod(w.name, "n1", 1.0, False, False, w) for w in (A, B))
    for pod in (client, server):
        cache.put(PODS, APISERVER, pod, now=0)
    agg = Ledger()
    agg.fold(entries([(KEY, FlowCounters(1, 1))]), cache, 0.0)
    relabelled = replace(server, workload=replace(B, canonical_revision="v2"))
    cache.put(PODS, APISERVER, relabelled, now=1)
    agg.fold(entries([(KEY, FlowCounters(3, 3))]), cache, 1.0)
    revisions = {labels[14]: s.counts[0] for labels, s in agg.workload.items()}
    assert revisions == {"latest": 1, "v2": 2}
