"""One publish: what the kernel counted, under the identities known now, out to /metrics
and the textfile.

    probe.sweep()          open connections' bytes into the kernel's flows
    probe.flows()    ──events.decode_flow──┐
    probe.unseen_closes() ─────────────────┴─> aggregate.fold ──> Snapshot ──> collector
                                                                           └──> textfile
A scrape reads the collector's last snapshot, so it never waits on a publish: a publish
that hangs in the kernel leaves /metrics answering with the previous one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from kmeshd.accesslog.records import RecordFeed
from kmeshd.aggregate import Aggregate, add_unseen_closes
from kmeshd.clock import Clock
from kmeshd.events import decode_flow, decode_flow_key
from kmeshd.export.metrics import KmeshCollector, Snapshot
from kmeshd.export.textfile import Textfile
from kmeshd.health import daemon_health
from kmeshd.identity.model import IdentityView
from kmeshd.kernel.layout import Stat
from kmeshd.kernel.sockdiag import SockDiagError
from kmeshd.known import KnownAddresses
from kmeshd.ratelimit import LOG_EVERY_S, Throttle

log = logging.getLogger(__name__)


class FlowReader(Protocol):
    """What a publish reads of the probe (kernel.probe.Probe)."""

    def sweep(self, on_error: Callable[[SockDiagError], None]) -> int: ...
    def flows(self) -> Iterator[tuple[bytes, bytes]]: ...
    def unseen_closes(self) -> dict[bytes, int]: ...
    def stats(self) -> dict[Stat, int]: ...


class Publisher:
    """Publishes the probe's flows through `collector` (and `textfile`, when configured)."""

    def __init__(
        self,
        probe: FlowReader,
        collector: KmeshCollector,
        textfile: Textfile | None,
        feed: RecordFeed,
        known: KnownAddresses,
        clock: Clock,
    ) -> None:
        self.aggregate = Aggregate()
        self.textfile = textfile
        self._probe = probe
        self._collector = collector
        self._feed = feed
        self._known = known
        self._clock = clock
        self._sweep_complaints = Throttle(LOG_EVERY_S, clock.monotonic)
        self.last = 0.0  # wall time of the last publish
        self.seconds = 0.0  # how long it took

    def publish(self, view: IdentityView, sources_up: Mapping[str, bool], policy: str) -> None:
        """Fold what the kernel counted since the last publish under `view`'s identities,
        and swap the result in; `policy` is connection_security_policy's value."""
        started = self._clock.monotonic()
        self._probe.sweep(self._sweep_failed)
        unseen = {decode_flow_key(k): n for k, n in self._probe.unseen_closes().items()}
        flows = add_unseen_closes((decode_flow(k, v) for k, v in self._probe.flows()), unseen)
        agg = self.aggregate
        agg.fold(flows, view, policy)
        self.last = self._clock.time()
        health = daemon_health(
            self._probe.stats(),
            feed=self._feed,
            known=self._known,
            textfile=self.textfile,
            unseen_closes=sum(unseen.values()),
            unattributed=agg.unattributed,
            sources=sources_up,
            last_publish=self.last,
            publish_seconds=self.seconds,
        )
        self._collector.update(
            Snapshot(
                dict(agg.workload),
                dict(agg.service),
                health,
                dict(agg.active_workload),
                dict(agg.active_service),
            )
        )
        if self.textfile is not None:
            self.textfile.write()
        self.seconds = self._clock.monotonic() - started

    def _sweep_failed(self, exc: SockDiagError) -> None:
        """A namespace the sweep could not enter: its connections' bytes come at close."""
        if self._sweep_complaints.ready():
            log.warning("socket sweep: %s; its open connections count at close only", exc)
