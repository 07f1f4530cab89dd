"""The daemon's own health, as each publish exports it under kmeshd_.

Every count lives with what it counts: the probe's per-CPU stats, the record feed's
records, the sinks' drops (kept across reloads by the Fanout), the textfile's failed
writes, the known-address set's refusals. `daemon_health` gathers them into one Health.
"""

from __future__ import annotations

from collections.abc import Mapping

from kmeshd import __version__
from kmeshd.accesslog.records import RecordFeed
from kmeshd.export.metrics import Health, SinkHealth
from kmeshd.export.textfile import Textfile
from kmeshd.kernel.layout import Stat
from kmeshd.known import KnownAddresses


def daemon_health(
    stats: Mapping[Stat, int],
    *,
    feed: RecordFeed,
    known: KnownAddresses,
    textfile: Textfile | None,
    unseen_closes: int,
    unattributed: int,
    sources: Mapping[str, bool],
    last_publish: float,
    publish_seconds: float,
) -> Health:
    """`stats`: the probe's counters; `unattributed`: what user space found unattributed
    beside the probe's count."""
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
        unattributed=stats[Stat.UNATTRIBUTED] + unattributed,
        unseen_closes=unseen_closes,
        sinks=tuple(sinks),
        textfile_failures=textfile.failures if textfile is not None else None,
        sources=sources,
        last_publish=last_publish,
        publish_seconds=publish_seconds,
    )
