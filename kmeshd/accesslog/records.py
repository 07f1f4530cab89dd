"""The producer end of the access log: a ring-buffer record, with the identities of both
ends, becomes an AccessRecord for every sink.

    raw bytes ──events.decode_record──> ConnectionRecord ──access_record()──> AccessRecord
              ──Fanout.write──> sinks

`RecordFeed` is what the probe calls for each record it drains. It handles at most
`accesslog.max_rate` records a second: past that it tells the probe to stop, and the rest
wait in the kernel's ring buffer (whose overflow the kernel counts), so a burst of
connections costs counted records, never a core taken from the node's real work. And one
drain lasts at most DRAIN_SLICE_S, so that even without a rate limit a flood of records
never keeps the main loop from publishing.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable

from kmeshd.accesslog.render import AccessRecord
from kmeshd.accesslog.sinks import Fanout
from kmeshd.events import ConnectionRecord, decode_record
from kmeshd.identity.model import UNKNOWN, IdentityView, IPAddress
from kmeshd.kernel.layout import Direction, Kind
from kmeshd.labels import ends_of
from kmeshd.ratelimit import LOG_EVERY_S, Throttle, TokenBucket

log = logging.getLogger("kmeshd")

DRAIN_SLICE_S = 0.05  # the longest one drain takes; the main loop ticks every 0.1 s


@functools.lru_cache(maxsize=65536)
def _host(ip: IPAddress) -> str:
    return f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def format_address(ip: IPAddress, port: int) -> str:
    """ "10.244.0.17:51842", "[fd00::11]:80" """
    return f"{_host(ip)}:{port}"


def access_record(rec: ConnectionRecord, ids: IdentityView, wall_offset_ns: int) -> AccessRecord:
    """A kernel record -> the access-log record; `wall_offset_ns` = realtime - monotonic."""
    outbound = rec.direction is Direction.OUTBOUND
    src, src_port = (rec.local, rec.local_port) if outbound else (rec.remote, rec.remote_port)
    dst, dst_port = (rec.remote, rec.remote_port) if outbound else (rec.local, rec.local_port)
    ends = ends_of(ids, src, dst, dst_port)
    return AccessRecord(
        time_ns=rec.time_ns + wall_offset_ns,
        src_addr=format_address(src, src_port),
        src_workload=ends.source.name if ends.source else UNKNOWN,
        src_namespace=ends.source.namespace if ends.source else UNKNOWN,
        dst_addr=format_address(dst, dst_port),
        dst_service=ends.service.hostname if ends.service else UNKNOWN,
        dst_workload=ends.destination.name if ends.destination else UNKNOWN,
        dst_namespace=ends.destination.namespace if ends.destination else UNKNOWN,
        direction=rec.direction.name,
        sent_bytes=rec.sent_bytes,
        received_bytes=rec.received_bytes,
        duration_ns=rec.duration_ns,
        failure_reason=rec.reason.name.lower() if rec.kind is Kind.FAILED else None,
        srtt_us=rec.srtt_us,
        min_rtt_us=rec.min_rtt_us,
        retransmits=rec.retransmits,
        segs_in=rec.segs_in,
        segs_out=rec.segs_out,
        periodic=rec.kind is Kind.PROGRESS,
    )


class RecordFeed:
    """Raw records -> the sinks, within `rate` records a second (0: no limit). The daemon
    keeps `view` on the identity source in use and `wall_offset_ns` (realtime minus
    monotonic, the kernel's clock) current."""

    def __init__(
        self, sinks: Fanout, view: IdentityView, rate: int, clock: Callable[[], float]
    ) -> None:
        self.sinks = sinks
        self.view = view
        self.wall_offset_ns = 0
        self.handled = 0  # records taken from the kernel: kmeshd_accesslog_records_total
        self.failed = 0  # of which no access-log record could be made
        self._complaints = Throttle(LOG_EVERY_S, clock)
        self._clock = clock
        self.budget = TokenBucket(rate, clock)
        self._slice_ends = float("inf")

    def __call__(self, raw: bytes) -> bool:
        """One record; False when the budget or the drain's time is spent (the probe stops
        draining)."""
        self.handled += 1
        try:
            record = access_record(decode_record(raw), self.view, self.wall_offset_ns)
        except Exception as exc:
            self._failed(raw, exc)
        else:
            self.sinks.write(record)
        return self.budget.take() and self._clock() < self._slice_ends

    def _failed(self, raw: bytes, exc: Exception) -> None:
        self.failed += 1
        if self._complaints.ready():
            log.error(
                "a kernel record (%d bytes) makes no access-log record: %r (%d so far)",
                len(raw),
                exc,
                self.failed,
                exc_info=exc,
            )

    def begin(self, slice_s: float | None = DRAIN_SLICE_S) -> bool:
        """Start a drain of at most `slice_s` seconds (None: until the ring buffer is empty);
        whether the budget allows a record now."""
        self._slice_ends = float("inf") if slice_s is None else self._clock() + slice_s
        return self.budget.available()

    def limit(self, rate: int) -> None:
        """A new budget: `rate` records a second, 0 for no limit."""
        if rate != self.budget.rate:
            self.budget = TokenBucket(rate, self._clock)
