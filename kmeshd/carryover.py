"""Pure: the counters a daemon hands to the next one, as bytes (metrics.state_file).

The kernel keeps a flow's counts only until its generation is retired; after that they
live in the daemon's memory alone. So that a restart neither loses them (counters going
back, which Prometheus takes for a reset and then counts what the kernel still holds a
second time) nor counts them twice, the daemon writes its label-set totals together with
what it last read of each kernel entry, each time it retires a generation (before the
kernel deletes it) and when it stops. The next daemon starts from those totals and folds
only what the kernel counted since, or, if the kernel's maps are not the ones the file
was written against (a reboot, a remade map), keeps the totals and folds the new maps'
entries in full.

The file is gzipped JSON (`zcat` shows it): a table of the label values, then each label
set as indexes into it with its counts, and the entries as hex (mostly zeros: 65,536 of
them take about 1.3 MB). It is validated like any input: anything wrong is a
CarryoverError that names the problem, and the daemon then starts from zero.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

from kmeshd.aggregate import LEVELS, Ledger, Slots
from kmeshd.config import HISTOGRAMS
from kmeshd.kernel.layout import FLOW_KEY
from kmeshd.labels import LabelValues

FORMAT = 1
LABELS = 23  # values in a label set, at either level
GZIP = 31  # zlib's wbits for gzip framing
MAX_BYTES = 1 << 30  # decompressed; a node's counters are tens of MB at most


class CarryoverError(ValueError):
    """A state file that cannot be used, and why."""


@dataclass(frozen=True)
class Carried:
    """What an earlier daemon counted: label-set totals by level (counts in this daemon's
    slots), its other counts, and its last reading of each kernel entry (empty unless
    the kernel's maps are the ones it read)."""

    levels: Mapping[str, list[tuple[LabelValues, list[int]]]]
    unattributed: int
    overflowed: Mapping[str, int]
    expired: int
    entries: Mapping[bytes, bytes]


def encode(ledger: Ledger, origin: str) -> bytes:
    """The ledger's counts, and its readings of the kernel's entries; `origin` names the
    kernel maps they were read from."""
    strings: dict[str, int] = {}

    def index(value: str) -> int:
        return strings.setdefault(value, len(strings))

    levels = {
        level: [[[index(v) for v in labels], s.counts] for labels, s in series_of.items()]
        for level, series_of in ledger.levels.items()
    }
    doc = {
        "format": FORMAT,
        "origin": origin,
        "histograms": list(ledger.slots.histograms),
        "strings": list(strings),
        "levels": levels,
        "unattributed": ledger.unattributed,
        "overflowed": ledger.overflowed,
        "expired": ledger.expired,
        "entries": [[key.hex(), raw.hex()] for key, raw in ledger.readings().items()],
    }
    compressor = zlib.compressobj(1, zlib.DEFLATED, GZIP)
    text = json.dumps(doc, separators=(",", ":")).encode()
    return compressor.compress(text) + compressor.flush()


def decode(data: bytes, slots: Slots, origin: str) -> Carried:
    """What `data` (from encode) carries, in `slots`; CarryoverError if it is not that."""
    try:
        inflater = zlib.decompressobj(GZIP)
        text = inflater.decompress(data, MAX_BYTES)
    except zlib.error as exc:
        raise CarryoverError(f"not gzip ({exc})") from None
    if inflater.unconsumed_tail:
        raise CarryoverError(f"larger than {MAX_BYTES} bytes once inflated")
    if not inflater.eof:
        raise CarryoverError("cut short (the gzip stream does not end)")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise CarryoverError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CarryoverError(f"not a kmeshd counters file of format {FORMAT}")
    saved = Slots(tuple(_strings(doc, "histograms", allowed=set(HISTOGRAMS))))
    strings = _strings(doc, "strings")
    levels = {level: _label_sets(doc, level, strings, saved, slots) for level in LEVELS}
    entries: dict[bytes, bytes] = {}
    if doc.get("origin") == origin:
        entries = _entries(doc.get("entries"), saved.width, slots.width)
    overflowed = doc.get("overflowed")
    if not isinstance(overflowed, dict):
        raise CarryoverError("overflowed: not an object")
    return Carried(
        levels=levels,
        unattributed=_count(doc.get("unattributed"), "unattributed"),
        overflowed={lv: _count(overflowed.get(lv, 0), f"overflowed.{lv}") for lv in LEVELS},
        expired=_count(doc.get("expired"), "expired"),
        entries=entries,
    )


def _count(value: Any, where: str) -> int:
    if type(value) is not int or value < 0:
        raise CarryoverError(f"{where}: {str(value)[:40]} is not a count")
    return value


def _strings(doc: Mapping[str, Any], key: str, allowed: set[str] | None = None) -> list[str]:
    values = doc.get(key)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise CarryoverError(f"{key}: not a list of strings")
    if allowed is not None and not set(values) <= allowed:
        raise CarryoverError(f"{key}: {sorted(set(values) - allowed)} unknown")
    return values


def _label_sets(
    doc: Mapping[str, Any], level: str, strings: list[str], saved: Slots, slots: Slots
) -> list[tuple[LabelValues, list[int]]]:
    """A level's label sets, their counts moved from the saved slots to `slots`: a
    histogram selected now that was not then starts at zero."""
    rows = doc.get("levels", {}).get(level) if isinstance(doc.get("levels"), dict) else None
    if not isinstance(rows, list):
        raise CarryoverError(f"levels.{level}: not a list")
    where = {pick: i for i, pick in enumerate(saved.picks)}
    out = []
    for n, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2):
            raise CarryoverError(f"levels.{level}[{n}]: not [labels, counts]")
        labels, counts = row
        if not (
            isinstance(labels, list)
            and len(labels) == LABELS
            and all(type(i) is int and 0 <= i < len(strings) for i in labels)
        ):
            raise CarryoverError(f"levels.{level}[{n}]: labels are not {LABELS} string indexes")
        if not isinstance(counts, list) or len(counts) != len(saved.picks):
            raise CarryoverError(f"levels.{level}[{n}]: not {len(saved.picks)} counts")
        for c in counts:
            _count(c, f"levels.{level}[{n}]")
        moved = [counts[where[p]] if p in where else 0 for p in slots.picks]
        out.append((tuple(strings[i] for i in labels), moved))
    return out


def _entries(rows: Any, saved_width: int, width: int) -> dict[bytes, bytes]:
    """Last readings of kernel entries, cut or padded to `width` bytes: a slot not read
    then reads as 0, so what the kernel holds of it is folded in full."""
    if not isinstance(rows, list):
        raise CarryoverError("entries: not a list")
    out = {}
    for n, row in enumerate(rows):
        try:
            key, raw = bytes.fromhex(row[0]), bytes.fromhex(row[1])
        except (TypeError, ValueError, IndexError, KeyError):
            raise CarryoverError(f"entries[{n}]: not [key, value] in hex") from None
        if len(key) != FLOW_KEY.size or len(raw) != saved_width:
            raise CarryoverError(f"entries[{n}]: not a flow key and {saved_width} bytes")
        out[key] = raw[:width] + bytes(max(0, width - len(raw)))
    return out


def restore(ledger: Ledger, carried: Carried, now: float, present: Container[bytes]) -> None:
    """Start `ledger` from what an earlier daemon counted. Only the readings of entries
    the kernel still has (`present`) are kept: the file saved at a retire also holds the
    retired generation's entries, which the kernel deleted right after; were their
    readings kept, the next entries under the same keys would be folded as if already
    counted."""
    entries = {key: value for key, value in carried.entries.items() if key in present}
    ledger.restore(carried.levels, entries, now)
    ledger.unattributed += carried.unattributed
    ledger.expired += carried.expired
    for level, n in carried.overflowed.items():
        ledger.overflowed[level] += n
