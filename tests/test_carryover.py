"""kmeshd.carryover: the counters one daemon hands to the next through metrics.state_file,
exact across a restart whether or not the kernel forgot the entries meanwhile, and every
way the file can be wrong refused with its problem named."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kmeshd import carryover
from kmeshd.aggregate import Ledger, Slots
from kmeshd.kernel.layout import Direction
from kmeshd.publish import Publisher
from tests.fakes import FakeClock, FakeProbe, flow_key, flow_value
from tests.test_publish import IDS, OUT, one, publisher, scraped

S = dict(reporter="source", source_workload="sleep")
D = dict(reporter="destination", source_workload="sleep")
W = "kmesh_tcp_workload_"
IN = flow_key("10.0.0.1", "10.0.0.2", 80, Direction.INBOUND)


def counts(pub: Publisher, labels: dict[str, str]) -> tuple[float, ...]:
    text = scraped(pub)
    return tuple(
        one(text, W + name, **labels)
        for name in (
            "connections_opened_total",
            "connections_closed_total",
            "received_bytes_total",
            "sent_bytes_total",
        )
    )


def restarted(probe: FakeProbe, clock: FakeClock, state: Path) -> Publisher:
    """A new daemon's publisher over the same kernel, from the saved counters."""
    pub = publisher(probe, clock, flow_expiry=60.0)
    pub.state = state
    pub.restore()
    return pub


def first_run(tmp_path: Path) -> tuple[FakeProbe, FakeClock, Publisher, Path]:
    """One connection counted, its generation retired (the kernel forgot it), then a
    second connection in the new generation, and a stop (the last save)."""
    probe, clock = FakeProbe(), FakeClock()
    pub = publisher(probe, clock, flow_expiry=60.0)
    pub.state = tmp_path / "counters.json.gz"
    probe.flows_map = {OUT: flow_value(1, 1, 292, 5), IN: flow_value(1, 1, 292, 5)}
    pub.publish(IDS, {})
    clock.sleep(61.0)
    pub.publish(IDS, {})  # retires generation 0: the kernel deletes both entries
    assert probe.flows_map == {}
    now = flow_key("10.0.0.1", "10.0.0.2", 80, Direction.OUTBOUND, generation=1)
    probe.flows_map = {now: flow_value(1, 0, 100, 0)}
    pub.publish(IDS, {})
    pub.save()
    assert counts(pub, S) == (2, 1, 392, 5)
    return probe, clock, pub, pub.state


def test_a_restart_goes_on_from_the_saved_counters_without_double_counting(
    tmp_path: Path,
) -> None:
    """After a stop and a start over the same kernel: the retired connection is still
    counted, the open one's bytes are not counted twice, and what the kernel adds after
    the start adds once."""
    probe, clock, _, state = first_run(tmp_path)
    now = flow_key("10.0.0.1", "10.0.0.2", 80, Direction.OUTBOUND, generation=1)
    probe.flows_map[now] = flow_value(1, 1, 130, 7)  # counted while no daemon ran
    pub = restarted(probe, clock, state)
    pub.publish(IDS, {})
    assert counts(pub, S) == (2, 2, 422, 12)
    assert counts(pub, D) == (1, 1, 292, 5)


def test_a_crash_after_the_save_but_before_the_kernel_forgot_counts_once(
    tmp_path: Path,
) -> None:
    """The save at a retire comes before the kernel's delete: if the daemon dies between
    them, the next one finds the retired entries still there and folds nothing of them
    twice; its own first retire then deletes them."""
    probe, clock = FakeProbe(), FakeClock()
    pub = publisher(probe, clock, flow_expiry=60.0)
    pub.state = tmp_path / "counters.json.gz"
    probe.flows_map = {OUT: flow_value(1, 1, 292, 5)}
    pub.publish(IDS, {})
    clock.sleep(61.0)
    kept = dict(probe.flows_map)
    pub.publish(IDS, {})  # saves, then deletes
    probe.flows_map = kept  # as if the delete never happened
    pub = restarted(probe, clock, pub.state)
    pub.publish(IDS, {})
    assert counts(pub, S) == (1, 1, 292, 5)
    clock.sleep(61.0)
    pub.publish(IDS, {})
    assert (probe.flows_map, pub.ledger.entries) == ({}, 0)
    assert counts(pub, S) == (1, 1, 292, 5)


def test_the_retired_entries_saved_before_their_delete_are_not_read_as_counted(
    tmp_path: Path,
) -> None:
    """The save at a retire holds the entries the kernel deletes right after. After a
    crash past that delete and a restart, new entries under those keys (a new program
    counts from generation 0 again) are counted in full, not taken for what was saved."""
    probe, clock = FakeProbe(), FakeClock()
    pub = publisher(probe, clock, flow_expiry=60.0)
    pub.state = tmp_path / "counters.json.gz"
    probe.flows_map = {OUT: flow_value(3, 3, 300, 30)}
    pub.publish(IDS, {})
    clock.sleep(61.0)
    pub.publish(IDS, {})  # saves (OUT as read), then the kernel deletes OUT
    assert probe.flows_map == {}
    pub = restarted(probe, clock, pub.state)  # killed before another save
    probe.generation = 0  # the new daemon's program counts from generation 0 again
    probe.flows_map = {OUT: flow_value(3, 3, 300, 30)}  # three more, the same key
    pub.publish(IDS, {})
    assert counts(pub, S) == (6, 6, 600, 60)


def test_new_kernel_maps_keep_the_totals_and_add_their_entries_in_full(
    tmp_path: Path,
) -> None:
    """After a reboot (another flows map): the saved totals carry on, and everything the
    new map holds is new."""
    _, clock, _, state = first_run(tmp_path)
    probe = FakeProbe()
    probe.origin = "fake flows map 2"
    probe.flows_map = {OUT: flow_value(1, 0, 10, 0)}
    pub = restarted(probe, clock, state)
    pub.publish(IDS, {})
    assert counts(pub, S) == (3, 1, 402, 5)


def test_a_missing_file_is_a_first_start_and_a_broken_one_is_logged_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe, clock = FakeProbe(), FakeClock()
    probe.flows_map = {OUT: flow_value(1, 1, 292, 5)}
    pub = restarted(probe, clock, tmp_path / "none.json")
    pub.publish(IDS, {})
    assert counts(pub, S) == (1, 1, 292, 5)
    assert caplog.records == []
    broken = tmp_path / "broken.json"
    broken.write_bytes(gzip.compress(b'{"format": 1, "origin"'))
    pub = restarted(probe, clock, broken)
    pub.publish(IDS, {})
    assert counts(pub, S) == (1, 1, 292, 5)
    aside = tmp_path / "broken.json.broken"
    assert [r.getMessage() for r in caplog.records] == [
        f"counters from the last run ({broken}): not JSON (Expecting ':' delimiter: line 1"
        f" column 23 (char 22)); counting from zero (kept as {aside})"
    ]
    assert gzip.decompress(aside.read_bytes()) == b'{"format": 1, "origin"'
    assert not broken.exists()


def test_a_save_that_fails_is_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe, clock = FakeProbe(), FakeClock()
    pub = publisher(probe, clock)
    pub.state = tmp_path / "missing" / "counters.json.gz"
    pub.save()
    pub.save()
    pub.publish(IDS, {})
    assert one(scraped(pub), "kmeshd_state_save_failures_total") == 2
    assert len(caplog.records) == 1
    assert (
        caplog.records[0]
        .getMessage()
        .startswith(f"cannot save the counters to {pub.state}: [Errno 2] No such file or directory")
    )


def test_histograms_selected_since_start_at_zero_and_dropped_ones_go() -> None:
    """Counts move by slot: the scalars stay, a histogram not saved starts at 0, and an
    entry's last reading is cut or padded to the new width."""
    ledger = Ledger(Slots(("srtt",)))
    probe = FakeProbe()
    probe.flows_map = {OUT: flow_value(1, 1, 292, 5)}
    for batch in probe.flow_entries():
        ledger.fold(batch, IDS, 0.0)
    data = carryover.encode(ledger, "o")
    wider = carryover.decode(data, Slots(("duration", "srtt")), "o")
    (labels, row) = wider.levels["workload"][0]
    slots = Slots(("duration", "srtt"))
    assert row[:5] == [1, 1, 0, 292, 5]
    assert len(row) == len(slots.picks)
    assert len(next(iter(wider.entries.values()))) == slots.width
    narrower = carryover.decode(data, Slots(), "o")
    assert len(narrower.levels["workload"][0][1]) == len(Slots().picks)
    assert len(next(iter(narrower.entries.values()))) == Slots().width


def one_exchange() -> Ledger:
    """A ledger that folded one 292/5-byte connection seen from both ends."""
    ledger = Ledger()
    probe = FakeProbe()
    probe.flows_map = {OUT: flow_value(1, 1, 292, 5), IN: flow_value(1, 1, 292, 5)}
    for batch in probe.flow_entries():
        ledger.fold(batch, IDS, 0.0)
    return ledger


def test_the_round_trip_keeps_every_count() -> None:
    ledger = one_exchange()
    ledger.unattributed, ledger.expired, ledger.overflowed["service"] = 3, 4, 5
    carried = carryover.decode(carryover.encode(ledger, "o"), ledger.slots, "o")
    other = Ledger()
    carryover.restore(other, carried, 0.0, present=carried.entries)
    for level in ("workload", "service"):
        assert {k: v.counts for k, v in other.levels[level].items()} == {
            k: v.counts for k, v in ledger.levels[level].items()
        }
    assert dict(other.readings()) == dict(ledger.readings())
    assert (other.unattributed, other.expired, other.overflowed) == (3, 4, ledger.overflowed)


def test_restored_label_sets_past_max_series_fold_into_the_overflow() -> None:
    ledger = one_exchange()
    carried = carryover.decode(carryover.encode(ledger, "o"), ledger.slots, "o")
    small = Ledger(max_series=1)
    carryover.restore(small, carried, 0.0, present=carried.entries)
    assert len(small.workload) == 2  # the first, and the overflow label set
    assert small.overflowed["workload"] == 1
    assert sorted(s.counts[3] for s in small.workload.values()) == [292, 292]


def saved() -> dict[str, object]:
    ledger = Ledger()
    probe = FakeProbe()
    probe.flows_map = {OUT: flow_value(1, 1, 292, 5)}
    for batch in probe.flow_entries():
        ledger.fold(batch, IDS, 0.0)
    doc: dict[str, object] = json.loads(gzip.decompress(carryover.encode(ledger, "o")))
    return doc


def edit(path: str, value: object) -> bytes:
    """The saved document with the value at `path` (dotted; digits index lists)."""
    doc = saved()
    *parents, last = path.split(".")
    node: object = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]  # type: ignore[index]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value  # type: ignore[index]
    return gzip.compress(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"{}", "not gzip"),
        (gzip.compress(b"{}")[:-12], "cut short (the gzip stream does not end)"),
        (gzip.compress(b"\xff\xfe"), "not JSON"),
        (gzip.compress(b"[]"), "not a kmeshd counters file of format 1"),
        (edit("format", 2), "not a kmeshd counters file of format 1"),
        (edit("histograms", ["latency"]), "histograms: ['latency'] unknown"),
        (edit("strings", [1]), "strings: not a list of strings"),
        (edit("levels.workload", {}), "levels.workload: not a list"),
        (edit("levels.workload.0", [1]), "levels.workload[0]: not [labels, counts]"),
        (edit("levels.workload.0.0", [0] * 22), "levels.workload[0]: labels are not 23"),
        (edit("levels.workload.0.0", [99] * 23), "levels.workload[0]: labels are not 23"),
        (edit("levels.workload.0.1", [0] * 9), "levels.workload[0]: not 10 counts"),
        (edit("levels.workload.0.1", [-1] + [0] * 9), "levels.workload[0]: -1 is not a count"),
        (edit("levels.workload.0.1", [True] + [0] * 9), "levels.workload[0]: True is not a"),
        (edit("entries", {}), "entries: not a list"),
        (edit("entries.0", ["zz", "00"]), "entries[0]: not [key, value] in hex"),
        (edit("entries.0", ["00", "00"]), "entries[0]: not a flow key and 80 bytes"),
        (edit("entries.0", 7), "entries[0]: not [key, value] in hex"),
        (edit("unattributed", "3"), "unattributed: 3 is not a count"),
        (edit("overflowed", []), "overflowed: not an object"),
        (edit("overflowed.workload", -2), "overflowed.workload: -2 is not a count"),
    ],
)
def test_a_file_that_is_not_right_is_refused_with_its_problem(data: bytes, problem: str) -> None:
    with pytest.raises(carryover.CarryoverError) as err:
        carryover.decode(data, Slots(), "o")
    assert str(err.value).startswith(problem)
