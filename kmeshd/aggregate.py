"""Pure: fold the kernel's flow entries into label-set counters, and keep them bounded.

Each kernel entry (a flow in one generation, see struct flow_key) holds counts since it
was created. A publish folds into its label sets only what changed since the entry was
last read, labelled with the identities known *now*: a reload that moves an address to
another workload changes where new counts go. The invariants:

- a counter of a label set never goes down while the label set exists;
- every count of an entry is folded once: an entry is read until it is retired (its
  final values folded, then `forget`), and an entry whose counts went down (its map was
  recreated) starts over from 0;
- a level holds at most `max_series` label sets. A new one past that folds into the
  level's overflow label set (identity labels "overflow"), counted in `overflowed`; a
  label set naming an identity no longer known, with no open connection and no change
  for `series_ttl`, leaves (`expire`).

Connections open now are counted afresh at each publish from the kernel's sockets, under
the identities known now. Only the counter slots exported are kept: the ten scalar
counters, and the histograms `histograms` names.
"""

from __future__ import annotations

import operator
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kmeshd.config import HISTOGRAMS
from kmeshd.events import FlowKey, decode_flow_key
from kmeshd.identity.model import UNKNOWN, IdentityView, Name
from kmeshd.kernel.layout import BUCKETS, FLOW_COUNTERS, FLOW_KEY, Entries
from kmeshd.labels import Ends, LabelValues, ends_of, flow_labels

# struct flow_counters: scalar counters, then the histograms (HISTOGRAMS, in that order).
SCALARS = tuple(name for name, code in FLOW_COUNTERS.fields if code == "Q")
HISTOGRAM_SLOTS = BUCKETS + 1  # the buckets, then the sum
OPENED, CLOSED, FAILED = 0, 1, 2
OVERFLOW = "overflow"
LEVELS = ("workload", "service")
# The labels that keep their value in the overflow label set; every other says "overflow".
_KEPT_IN_OVERFLOW = frozenset({0, 20, 21, 22})  # reporter, protocol, flags, policy


@dataclass(slots=True, eq=False)
class LabelSet:
    """One series' counts (the kept slots, cumulative), its open connections now, when
    its counts last changed (monotonic seconds), and whether it is still exported."""

    counts: list[int]
    changed_at: float
    active: int = 0
    live: bool = True


@dataclass(slots=True)
class _Route:
    """Where one flow's counts went last time: the view and its version then, the
    identities its ends had (compared by identity: the sources replace an object that
    changes), and the two label sets."""

    flow: FlowKey
    view: IdentityView
    version: int
    ends: Ends
    series: tuple[LabelSet, LabelSet] | None  # None: neither end known


@dataclass(frozen=True)
class Slots:
    """Which slots of struct flow_counters are kept: the scalars, and the named histograms
    (each BUCKETS per-bucket counts and a sum)."""

    histograms: tuple[str, ...] = ()
    width: int = field(init=False)  # bytes of an entry's value that matter
    codec: struct.Struct = field(init=False)
    picks: tuple[int, ...] = field(init=False)  # kept slot -> index in the unpacked value
    _all: bool = field(init=False)  # every slot unpacked is kept

    def __post_init__(self) -> None:
        unknown = set(self.histograms) - set(HISTOGRAMS)
        if unknown:
            raise ValueError(f"no histograms {sorted(unknown)}")
        ordered = tuple(h for h in HISTOGRAMS if h in self.histograms)
        object.__setattr__(self, "histograms", ordered)
        last = max((HISTOGRAMS.index(h) + 1 for h in ordered), default=0)
        slots = len(SCALARS) + last * HISTOGRAM_SLOTS
        picks = [*range(len(SCALARS))]
        for h in ordered:
            start = len(SCALARS) + HISTOGRAMS.index(h) * HISTOGRAM_SLOTS
            picks += range(start, start + HISTOGRAM_SLOTS)
        object.__setattr__(self, "width", slots * 8)
        object.__setattr__(self, "codec", struct.Struct(f"={slots}Q"))
        object.__setattr__(self, "picks", tuple(picks))
        object.__setattr__(self, "_all", len(picks) == slots)

    def unpack(self, raw: bytes) -> list[int]:
        """The kept slots of an entry's value (its first `width` bytes)."""
        values = self.codec.unpack(raw)
        return list(values) if self._all else [values[i] for i in self.picks]

    def offset(self, histogram: str) -> int:
        """Where `histogram`'s slots start among the kept ones."""
        return len(SCALARS) + self.histograms.index(histogram) * HISTOGRAM_SLOTS


def overflow_labels(labels: LabelValues) -> LabelValues:
    """The overflow label set of `labels`' reporter and policy."""
    return tuple(v if i in _KEPT_IN_OVERFLOW else OVERFLOW for i, v in enumerate(labels))


def names_of(labels: LabelValues, level: str) -> list[Name]:
    """The identities a label set names (its "-" parts name none)."""
    names: list[Name] = []
    for first in (1, 12):  # the source's and the destination's eight identity labels
        values = labels[first : first + 8]
        if values[0] != UNKNOWN:
            names.append(("workload", *values))
    namespace, name = labels[10], labels[11]  # destination_pod_* or destination_service_*
    if name != UNKNOWN:
        names.append(("pod" if level == "workload" else "service", namespace, name))
    return names


class Ledger:
    """Label-set totals of both levels, and what was last read of each kernel entry."""

    def __init__(
        self,
        slots: Slots | None = None,
        max_series: int = 20000,
        series_ttl: float = 300.0,
        policy: str = "unknown",
    ) -> None:
        self.slots = slots or Slots()
        self.max_series = max_series
        self.series_ttl = series_ttl
        self._policy = policy
        self.levels: dict[str, dict[LabelValues, LabelSet]] = {lv: {} for lv in LEVELS}
        self.unattributed = 0  # connections (opened or failed) with no known end
        self.overflowed = {lv: 0 for lv in LEVELS}  # label sets folded into overflow
        self.expired = 0  # label sets that left
        self._last: dict[bytes, bytes] = {}  # entry key -> its value's kept bytes
        self._routes: dict[bytes, _Route] = {}  # flow key (generation 0) -> its route
        # Label sets recently folded into overflow, so that each counts once while seen.
        self._overflow_seen: OrderedDict[tuple[str, LabelValues], float] = OrderedDict()

    @property
    def policy(self) -> str:
        """connection_security_policy's value in new label sets."""
        return self._policy

    @policy.setter
    def policy(self, policy: str) -> None:
        if policy != self._policy:
            self._policy = policy
            self._routes.clear()  # their label sets carry the old value

    @property
    def workload(self) -> dict[LabelValues, LabelSet]:
        return self.levels["workload"]

    @property
    def service(self) -> dict[LabelValues, LabelSet]:
        return self.levels["service"]

    @property
    def entries(self) -> int:
        """Kernel entries being followed."""
        return len(self._last)

    def fold(self, entries: Entries, ids: IdentityView, now: float) -> None:
        """Add what each entry counted since it was last read."""
        width, key_size, value_size = self.slots.width, FLOW_KEY.size, FLOW_COUNTERS.size
        keys, values, last, unpack = entries.keys, entries.values, self._last, self.slots.unpack
        for i in range(entries.total):
            at = i * value_size
            raw = values[at : at + width]
            key = keys[i * key_size : (i + 1) * key_size]
            before = last.get(key)
            if before == raw:
                continue
            last[key] = raw
            delta = unpack(raw)
            if before is not None:
                moved = list(map(operator.sub, delta, unpack(before)))
                if min(moved) >= 0:  # else the map was recreated: all of it is new
                    delta = moved
            self._add(key[:-1] + b"\0", delta, ids, now)

    def fold_closes(
        self, closes: Iterable[tuple[bytes, int]], ids: IdentityView, now: float
    ) -> None:
        """Count as closed the connections that closed while no probe ran."""
        width = len(self.slots.picks)
        for key, n in closes:
            delta = [0] * width
            delta[CLOSED] = n
            self._add(key, delta, ids, now)

    def count_open(self, open_now: Mapping[bytes, int], ids: IdentityView, now: float) -> None:
        """Connections open now, by flow key: each label set's `active`, afresh."""
        for series_of in self.levels.values():
            for series in series_of.values():
                series.active = 0
        for key, n in open_now.items():
            for series in self._route(key, ids, now) or ():
                series.active += n

    def readings(self) -> Mapping[bytes, bytes]:
        """Entry key -> the kept bytes of its value when last read."""
        return self._last

    def not_of(self, generation: int) -> list[bytes]:
        """The entries read of generations other than `generation`."""
        return [key for key in self._last if key[-1] != generation]

    def restore(
        self,
        levels: Mapping[str, Iterable[tuple[LabelValues, list[int]]]],
        readings: Mapping[bytes, bytes],
        now: float,
    ) -> None:
        """Start from an earlier daemon's label-set totals, and its last readings of the
        kernel's entries (so that only what they counted since is folded). Past
        max_series, label sets fold into the overflow label set as new ones would."""
        for level, rows in levels.items():
            for labels, counts in rows:
                series = self._series(level, labels, now)
                series.counts[:] = map(operator.add, series.counts, counts)
        self._last.update(readings)

    def forget(self, keys: Iterable[bytes]) -> None:
        """Entries the kernel no longer has (retired, their final counts folded)."""
        for key in keys:
            self._last.pop(key, None)
        flows = {key[:-1] + b"\0" for key in self._last}
        self._routes = {k: r for k, r in self._routes.items() if k in flows}

    def expire(self, ids: IdentityView, now: float) -> int:
        """Remove the label sets naming an identity no longer known that have no open
        connection and no change for series_ttl; returns how many left."""
        gone = 0
        for level, series_of in self.levels.items():
            stale = [
                labels
                for labels, s in series_of.items()
                if not s.active
                and now - s.changed_at >= self.series_ttl
                and not all(ids.knows(name) for name in names_of(labels, level))
            ]
            for labels in stale:
                series_of.pop(labels).live = False
            gone += len(stale)
        for seen, at in list(self._overflow_seen.items()):
            if now - at < self.series_ttl:
                break
            del self._overflow_seen[seen]
        self.expired += gone
        return gone

    def _route(self, key: bytes, ids: IdentityView, now: float) -> tuple[LabelSet, LabelSet] | None:
        """The label sets of flow `key` (generation 0) under the identities of now. Kept
        per flow and reused while its ends resolve to the same objects and its label sets
        are exported: labelling is most of what a flow costs a publish."""
        route = self._routes.get(key)
        live = route is not None and (
            route.series is None or (route.series[0].live and route.series[1].live)
        )
        if live and route is not None and route.view is ids and route.version == ids.version:
            return route.series  # nothing changed that could move it
        flow = route.flow if route is not None else decode_flow_key(key)
        ends = ends_of(ids, flow.client, flow.server, flow.server_port)
        if live and route is not None and all(map(operator.is_, ends, route.ends)):
            route.view, route.version = ids, ids.version
            return route.series
        series = None
        if ends.known():
            labels = flow_labels(flow, ends, self.policy)
            series = (
                self._series(LEVELS[0], labels[0], now),
                self._series(LEVELS[1], labels[1], now),
            )
        self._routes[key] = _Route(flow, ids, ids.version, ends, series)
        return series

    def _add(self, key: bytes, delta: list[int], ids: IdentityView, now: float) -> None:
        if not any(delta):
            return
        series = self._route(key, ids, now)
        if series is None:
            self.unattributed += delta[OPENED] + delta[FAILED]
            return
        for s in series:
            counts = s.counts
            for i, d in enumerate(delta):
                if d:
                    counts[i] += d
            s.changed_at = now

    def _series(self, level: str, labels: LabelValues, now: float) -> LabelSet:
        """The label set `labels` of `level`, made if new: past max_series, the overflow."""
        series_of = self.levels[level]
        series = series_of.get(labels)
        if series is not None:
            return series
        if len(series_of) >= self.max_series:
            self._note_overflow(level, labels, now)
            labels = overflow_labels(labels)
            series = series_of.get(labels)
            if series is not None:
                return series
        series = LabelSet([0] * len(self.slots.picks), now)
        series_of[labels] = series
        return series

    def _note_overflow(self, level: str, labels: LabelValues, now: float) -> None:
        """Count a label set refused for the first time while it is seen (within the TTL,
        remembering at most max_series of them)."""
        seen = (level, labels)
        if seen not in self._overflow_seen:
            self.overflowed[level] += 1
            if len(self._overflow_seen) >= self.max_series:
                self._overflow_seen.popitem(last=False)
        self._overflow_seen[seen] = now
        self._overflow_seen.move_to_end(seen)
