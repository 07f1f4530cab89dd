"""One publish: what the kernel counted, under the identities known now, out to /metrics
and the textfile.

    probe.sweep()              open connections' bytes into the kernel's flows
    probe.new_generation()     every bpf.flow_expiry: flows counted in a new generation
    probe.flow_entries()  ─┐
    probe.take_unseen_closes() ─> ledger.fold ──> exposition.render ─┬─> gzip ──> /metrics
    probe.open_connections() ─┘   ledger.expire                      └─> textfile
    probe.forget_flows()       the old generation's entries, read for the last time

A scrape is served from the last publish's bytes, so it never waits on a publish: a
publish that hangs in the kernel leaves /metrics answering with the previous one.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

from kmeshd import carryover
from kmeshd.accesslog.records import RecordFeed
from kmeshd.aggregate import Ledger
from kmeshd.clock import Clock
from kmeshd.export.exposition import Exposition
from kmeshd.export.http import Body, MetricsServer
from kmeshd.export.metrics import health_text
from kmeshd.export.textfile import Textfile
from kmeshd.files import write_atomic
from kmeshd.health import KernelMaps, daemon_health
from kmeshd.identity.model import IdentityView
from kmeshd.kernel.layout import Entries, Stat
from kmeshd.kernel.memory import release_freed_memory
from kmeshd.known import KnownAddresses
from kmeshd.ratelimit import LOG_EVERY_S, Throttle
from kmeshd.supervise import Guard

log = logging.getLogger(__name__)

GZIP_LEVEL = 1  # the text is repetitive: level 1 compresses ~50x, at a fraction of the CPU


class FlowReader(Protocol):
    """What a publish reads of the probe (kernel.probe.Probe)."""

    generation: int
    flows_capacity: int
    origin: str

    unreached: int

    def sweep(self) -> None: ...
    def flow_entries(self) -> Iterator[Entries]: ...
    def keys_at_start(self) -> set[bytes]: ...
    def open_connections(self) -> dict[bytes, int]: ...
    def take_unseen_closes(self) -> list[tuple[bytes, int]]: ...
    def new_generation(self) -> int: ...
    def forget_flows(self, keys: bytes) -> int: ...
    def stats(self) -> dict[Stat, int]: ...


class Publisher:
    """Publishes the probe's flows to `server` and `textfile`, when there are."""

    def __init__(
        self,
        probe: FlowReader,
        ledger: Ledger,
        server: MetricsServer | None,
        textfile: Textfile | None,
        feed: RecordFeed,
        known: KnownAddresses,
        clock: Clock,
        flow_expiry: float,
        state: Path | None = None,
        guard: Guard | None = None,
        interval: float = 0.0,
    ) -> None:
        self.ledger = ledger
        self.guard = guard or Guard(clock.monotonic)  # the main loop's failures, exported
        self.state = state  # metrics.state_file: counters for the next daemon
        self.server = server
        self.textfile = textfile
        self.flow_expiry = flow_expiry
        self.interval = interval  # metrics.interval, exported for the no-publish alert
        self._probe = probe
        self._exposition = Exposition(ledger.slots)
        self._feed = feed
        self._known = known
        self._clock = clock
        self._full_complaints = Throttle(LOG_EVERY_S, clock.monotonic)
        self._overflow_complaints = Throttle(LOG_EVERY_S, clock.monotonic)
        self._overflowed = 0
        self._save_complaints = Throttle(LOG_EVERY_S, clock.monotonic)
        self._unreached_notes = Throttle(LOG_EVERY_S, clock.monotonic)
        self.save_failures = 0
        self._generation_at = clock.monotonic()
        self._flows_full = 0
        self.generations = 0  # retired so far
        self.unseen_closes = 0  # closes the closed-socket sweep handed over
        self.last = 0.0  # wall time of the last publish
        self.seconds = 0.0  # how long it took
        self.body = Body()  # what it rendered

    def publish(
        self,
        view: IdentityView,
        sources_up: Mapping[str, bool],
        rejected: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        """Fold what the kernel counted since the last publish under `view`'s identities,
        and hand the rendering to /metrics and the textfile. `sources_up` and `rejected`
        (objects the identity sources skipped, by source and resource) are exported."""
        started = now = self._clock.monotonic()
        probe, ledger = self._probe, self.ledger
        probe.sweep()
        retiring = now - self._generation_at >= self.flow_expiry
        if retiring:  # from here on the old generation's entries no longer change
            probe.new_generation()
            self._generation_at = now
        entries = 0
        for batch in probe.flow_entries():
            ledger.fold(batch, view, now)
            entries += batch.total
        old = ledger.not_of(probe.generation) if retiring else []
        closes = probe.take_unseen_closes()
        ledger.fold_closes(closes, view, now)
        self.unseen_closes += sum(n for _key, n in closes)
        ledger.count_open(probe.open_connections(), view, now)
        self._note_unreached(probe.unreached)
        if retiring:
            self.save()  # before the kernel forgets them: a crash between loses nothing
            self._retire(old)
            self.generations += 1
        ledger.expire(view, now)
        stats = probe.stats()
        self._watch_flows(stats[Stat.FLOWS_FULL])
        self._watch_overflow()
        self.last = self._clock.time()
        maps = KernelMaps(entries - len(old), probe.flows_capacity, self.generations)
        self._render(stats, maps, sources_up, rejected or {})
        self.seconds = self._clock.monotonic() - started

    def restore(self) -> None:
        """Start from the counters the last daemon saved, if it did (see carryover)."""
        kept = self._probe.keys_at_start()
        if self.state is None:
            return
        try:
            data = self.state.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("counters from the last run (%s): %s; counting from zero", self.state, exc)
            return
        try:
            carried = carryover.decode(data, self.ledger.slots, self._probe.origin)
        except carryover.CarryoverError as exc:
            aside = self._put_aside()
            log.warning("counters from the last run (%s): %s; counting from zero%s",
                        self.state, exc, aside)  # fmt: skip
            return
        carryover.restore(self.ledger, carried, self._clock.monotonic(), kept)
        log.info(
            "counters from the last run: %d label sets, %d kernel entries as last read%s",
            sum(len(rows) for rows in carried.levels.values()),
            len(carried.entries),
            "" if carried.entries else " (none: the kernel's flows map is not the one saved)",
        )

    def _put_aside(self) -> str:
        """Keep an unreadable state file for a look (the next save would replace it)."""
        assert self.state is not None
        aside = self.state.with_name(self.state.name + ".broken")
        try:
            self.state.replace(aside)
        except OSError as exc:
            return f" (cannot keep it as {aside}: {exc})"
        return f" (kept as {aside})"

    def save(self) -> None:
        """Write the counters for the next daemon; a failure is logged and counted."""
        if self.state is None:
            return
        try:
            write_atomic(self.state, carryover.encode(self.ledger, self._probe.origin), 0o600)
        except OSError as exc:
            self.save_failures += 1
            if self._save_complaints.ready():
                log.warning(
                    "cannot save the counters to %s: %s; a restart would count from zero",
                    self.state,
                    exc,
                )

    def _note_unreached(self, unreached: int) -> None:
        """Open connections the socket sweep could not read: counted in a gauge, and said
        (once a minute at most) so that a node where that is the rule is noticed."""
        if unreached and self._unreached_notes.ready():
            log.info(
                "socket sweep: %d open connections not read (no process holds a file of"
                " them: an accept queue, io_uring, the kernel; or in use at each try); their"
                " bytes come at a later sweep or at close (kmeshd_sweep_sockets_unreached)",
                unreached,
            )

    def _retire(self, old: list[bytes]) -> None:
        """Delete the entries of earlier generations, folded for the last time just now."""
        self._probe.forget_flows(b"".join(old))
        self.ledger.forget(old)
        # A generation's flows and their routes are freed together: hand the heap they
        # leave back, or months of churning peers leave the RSS in fragments.
        release_freed_memory()

    def _render(
        self,
        stats: dict[Stat, int],
        maps: KernelMaps,
        sources: Mapping[str, bool],
        rejected: Mapping[tuple[str, str], int],
    ) -> None:
        health = daemon_health(
            stats,
            feed=self._feed,
            known=self._known,
            textfile=self.textfile,
            ledger=self.ledger,
            maps=maps,
            unseen_closes=self.unseen_closes,
            sweep_unreached=self._probe.unreached,
            sources=sources,
            rejected=rejected,
            last_publish=self.last,
            publish_seconds=self.seconds,
            publish_interval=self.interval,
            state_failures=self.save_failures if self.state is not None else None,
            guard=self.guard,
            server=self.server,
        )
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip framing
        draft = self.textfile.draft() if self.textfile is not None else None
        parts, size = [], 0
        for text in itertools.chain(self._exposition.render(self.ledger), [health_text(health)]):
            data = text.encode()
            size += len(data)
            parts.append(compressor.compress(data))
            if draft is not None:
                draft.write(data)
        parts.append(compressor.flush())
        if draft is not None:
            draft.close()
        self.body = Body(b"".join(parts), size)
        if self.server is not None:
            self.server.publish(self.body)

    def _watch_flows(self, refused: int) -> None:
        """A full flows map is logged, not only counted: its flows are not being counted."""
        if refused > self._flows_full and self._full_complaints.ready():
            log.warning(
                "the kernel's flows map is full (%d entries): %d flow updates refused so far;"
                " raise bpf.max_flows or lower bpf.flow_expiry",
                self._probe.flows_capacity,
                refused,
            )
        self._flows_full = refused

    def _watch_overflow(self) -> None:
        """Label sets refused by the cap are logged, not only counted."""
        folded = sum(self.ledger.overflowed.values())
        if folded > self._overflowed and self._overflow_complaints.ready():
            log.warning(
                "%d label sets past metrics.max_series (%d a level) folded into the overflow"
                " label set so far (%s); raise metrics.max_series, or lower series_ttl",
                folded,
                self.ledger.max_series,
                ", ".join(f"{lv} {n}" for lv, n in self.ledger.overflowed.items()),
            )
        self._overflowed = folded
