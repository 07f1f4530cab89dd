"""The daemon's own health, as each publish exports it under kmeshd_.

Every count lives with what it counts: the probe's per-CPU stats, the record feed's
records, the sinks' drops (kept across reloads by the Fanout), the textfile's failed
writes, the known-address set's refusals, the ledger's label sets. `daemon_health`
gathers them into one Health.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

from kmeshd import __version__
from kmeshd.accesslog.records import RecordFeed
from kmeshd.aggregate import Ledger
from kmeshd.export.http import MetricsServer
from kmeshd.export.metrics import Health, SinkHealth
from kmeshd.export.textfile import Textfile
from kmeshd.kernel.layout import Stat
from kmeshd.known import KnownAddresses
from kmeshd.supervise import LOOP_STEPS, RESTARTS, Guard


class KernelMaps(NamedTuple):
    """The flows map at the publish: its occupancy, and generations retired so far."""

    flows: int
    flows_capacity: int
    generations: int


def daemon_health(
    stats: Mapping[Stat, int],
    *,
    feed: RecordFeed,
    known: KnownAddresses,
    textfile: Textfile | None,
    ledger: Ledger,
    maps: KernelMaps,
    unseen_closes: int,
    sweep_unreached: int = 0,
    sources: Mapping[str, bool],
    rejected: Mapping[tuple[str, str], int] | None = None,
    last_publish: float,
    publish_seconds: float,
    publish_interval: float = 0.0,
    state_failures: int | None = None,
    guard: Guard | None = None,
    server: MetricsServer | None = None,
) -> Health:
    """`stats`: the probe's counters."""
    errors = guard.errors if guard is not None else Counter[str]()
    sinks = [SinkHealth(s.name, s.up, feed.sinks.dropped(s)) for s in feed.sinks.sinks]
    if textfile is not None:
        sinks.append(SinkHealth("textfile", textfile.up, None))
    return Health(
        version=__version__,
        events={
            "opened": stats[Stat.OPENED],
            "closed": stats[Stat.CLOSED],
            "failed": stats[Stat.FAILED],
        },
        events_lost=stats[Stat.RINGBUF_LOST],
        records=feed.handled,
        map_full={
            "flows": stats[Stat.FLOWS_FULL],
            "sockets": stats[Stat.SOCKS_FULL],
            "known_addrs": known.refused,
        },
        unattributed=stats[Stat.UNATTRIBUTED] + ledger.unattributed,
        unseen_closes=unseen_closes,
        sweep_unreached=sweep_unreached,
        sweep_busy=stats[Stat.SWEEP_BUSY],
        sinks=tuple(sinks),
        textfile_failures=textfile.failures if textfile is not None else None,
        state_failures=state_failures,
        sources=sources,
        objects_rejected=rejected or {},
        last_publish=last_publish,
        publish_seconds=publish_seconds,
        publish_interval=publish_interval,
        textfile_write_seconds=textfile.write_seconds if textfile is not None else None,
        series={level: len(series) for level, series in ledger.levels.items()},
        series_overflow=dict(ledger.overflowed),
        series_expired=ledger.expired,
        map_entries={"flows": maps.flows},
        map_capacity={"flows": maps.flows_capacity},
        flow_generations=maps.generations,
        publish_errors=errors["publish"],
        loop_errors={step: errors[step] for step in LOOP_STEPS},
        thread_restarts=dict(RESTARTS),
        records_failed=feed.failed,
        http_refused=server.refused if server is not None else None,
    )
