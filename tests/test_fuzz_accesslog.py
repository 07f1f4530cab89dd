"""Property-based: `kmeshd accesslog`'s decoding of journal entries, and the decoding of
ring-buffer records, hold up to garbage. Every input either comes out (rendered, decoded)
or is counted as skipped or rejected; nothing raises anything else."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kmeshd.accesslog.query import Filters, Skipped, one, render, written_by_kmeshd
from kmeshd.accesslog.render import JSON_KEYS, fields, journal_fields, journal_key
from kmeshd.events import BadRecord, decode_record
from kmeshd.kernel.layout import CONN_RECORD
from tests.test_query import KMESHD, printed
from tests.test_render import SEED

KMESHD_FIELDS = [journal_key(k) for k in JSON_KEYS]
TRUSTED = ["_UID", "_COMM", "_CMDLINE", "_SYSTEMD_UNIT", "__CURSOR", "__REALTIME_TIMESTAMP"]
NAMES = st.sampled_from([*KMESHD_FIELDS, *TRUSTED, "MESSAGE", "MESSAGE_ID"]) | st.text()

# What journalctl -o json can print for a field, and then some: text, digits, huge
# numbers, arrays of bytes (and of not-bytes), repeated values, and any JSON value.
SCALARS = (
    st.text()
    | st.integers().map(str)
    | st.integers(min_value=2**64 - 2, max_value=2**70).map(str)
    | st.sampled_from(["0", "kmeshd", "kmeshd.service", "python3 -m kmeshd.cli run", ""])
)
VALUES = st.recursive(
    SCALARS
    | st.lists(st.integers(min_value=-1, max_value=256))
    | st.binary().map(list)
    | st.none()
    | st.booleans()
    | st.floats(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


def changed(base: dict[str, Any], changes: dict[str, Any], drop: list[str]) -> dict[str, Any]:
    entry = {**base, **changes}
    for name in drop:
        entry.pop(name, None)
    return entry


BASE = {**journal_fields(SEED), **KMESHD}
ENTRIES = st.builds(
    changed,
    st.just(BASE) | st.just({}),
    st.dictionaries(NAMES, VALUES, max_size=6),
    st.lists(st.sampled_from([*KMESHD_FIELDS, "MESSAGE", *TRUSTED])),
)
FILTERS = st.builds(Filters, service=st.none() | st.sampled_from(["productpage", "web.x"]))


@given(entry=ENTRIES, f=FILTERS, output=st.sampled_from(["text", "json"]))
def test_any_entry_is_printed_or_counted(entry: dict[str, Any], f: Filters, output: str) -> None:
    """An arbitrary entry: printed as one line, left out by the filter, or counted as
    another writer's or malformed; never an exception."""
    skipped = Skipped()
    shown = one(json.dumps(entry), f, output, skipped)
    counted = skipped.foreign + skipped.malformed
    assert counted <= 1
    if shown is not None:
        assert counted == 0
        shown.encode()  # printable to any UTF-8 stream
        if output == "json":
            assert isinstance(json.loads(shown), dict)
    if counted:
        assert all(line.startswith("kmeshd: skipped 1 ") for line in skipped.report())
    if not written_by_kmeshd(entry):
        assert (shown, skipped.foreign) == (None, 1)


@given(lines=st.lists(st.text() | ENTRIES.map(json.dumps), max_size=5))
def test_any_line_is_printed_or_counted(lines: list[str]) -> None:
    """journalctl's output replaced by arbitrary lines: never raises, and every non-blank
    line is accounted for."""
    skipped = Skipped()
    out = list(render(lines, Filters(), "text", skipped))
    blank = sum(1 for line in lines if not line.strip())
    assert len(out) + skipped.foreign + skipped.malformed + blank == len(lines)


COUNTS = st.integers(min_value=0, max_value=2**64 - 1)


@given(sent=COUNTS, segs_in=COUNTS)
def test_kmeshds_own_entries_come_back_whole(sent: int, segs_in: int) -> None:
    """What kmeshd writes is read back exactly, for every count a u64 can hold."""
    r = replace(SEED, sent_bytes=sent, segs_in=segs_in)
    line = json.dumps({**journal_fields(r), **KMESHD})
    skipped = Skipped()
    assert one(line, Filters(), "json", skipped) == json.dumps(fields(r), ensure_ascii=False)
    assert one(line, Filters(), "text", skipped) == printed(r)
    assert (skipped.foreign, skipped.malformed) == (0, 0)


RECORDS = st.binary(max_size=3 * CONN_RECORD.size) | st.binary(
    min_size=CONN_RECORD.size, max_size=CONN_RECORD.size
)


@given(raw=RECORDS)
def test_any_ring_buffer_record_is_decoded_or_rejected(raw: bytes) -> None:
    """Arbitrary bytes as a ring-buffer record: decoded, or a BadRecord that says why (the
    daemon's record feed counts it in kmeshd_accesslog_records_failed_total); nothing
    else is raised, and only a record of struct conn_record's size is ever decoded."""
    try:
        decode_record(raw)
    except BadRecord as exc:
        assert str(exc)
    else:
        assert len(raw) == CONN_RECORD.size
