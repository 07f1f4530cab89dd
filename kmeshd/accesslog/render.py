"""Access records and their renderings: JSON fields, the seed's text line, journal fields.

Pure: no IO. The producer (accesslog.records) fills an AccessRecord with "-" for what it
does not know; the sinks (accesslog.sinks) write what these functions render, and `kmeshd
accesslog` (accesslog.query) prints the text line of what journald kept.

    AccessRecord ──fields()──────────> JSON line          (FileSink)
                 ├─message()─────────> seed text          (journald MESSAGE)
                 │        └text_line()> "accesslog: ..."  (kmeshd accesslog)
                 └─journal_fields()──> KMESHD_* fields    (JournaldSink)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime

MESSAGE_ID = "2fbe419c00fb412cafa2600c22093fd2"
"""journald MESSAGE_ID of every access record (`journalctl MESSAGE_ID=...` finds them all)."""

SYSLOG_IDENTIFIER = "kmeshd"
PRIORITY_INFO = "6"

_NS_PER_S = 1_000_000_000

# The seed's text line names these keys, in this order; _OPTIONAL_KEYS follow when present.
_MESSAGE_KEYS = (
    "src.addr",
    "src.workload",
    "src.namespace",
    "dst.addr",
    "dst.service",
    "dst.workload",
    "dst.namespace",
    "direction",
    "sent_bytes",
    "received_bytes",
    "duration",
)

# Keys only some records have: failure_reason on failed connects, report on the periodic
# records of open connections. The text line ends with them when present.
_OPTIONAL_KEYS = ("failure_reason", "report")


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One observed socket close or failed connect, identities resolved ("-" = unknown)."""

    time_ns: int  # wall clock, ns since the epoch
    src_addr: str  # "10.244.0.17:51842", "[fd00::11]:80"
    src_workload: str  # instance (pod) name
    src_namespace: str
    dst_addr: str
    dst_service: str  # service hostname
    dst_workload: str  # instance (pod) name
    dst_namespace: str
    direction: str  # "INBOUND" | "OUTBOUND"
    sent_bytes: int  # bytes the destination sent
    received_bytes: int  # bytes the destination received
    duration_ns: int
    failure_reason: str | None  # None = a normal close; "refused" | "timeout" | "other"
    srtt_us: int
    min_rtt_us: int
    retransmits: int
    segs_in: int  # segments the reporting socket received
    segs_out: int  # segments it sent
    periodic: bool = False  # an open connection's totals so far (accesslog.periodic)


def _decimal(value: int, places: int) -> str:
    """value / 10**places, trailing zeros dropped, no point when whole (Go's fmtFrac)."""
    whole, frac = divmod(value, 10**places)
    digits = f"{frac:0{places}d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def go_duration(ns: int) -> str:
    """ns formatted exactly as Go's time.Duration.String(): "850µs", "2.733902ms", "1h0m0s"."""
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u == 0:
        return "0s"
    if u < 1_000:
        return f"{sign}{u}ns"
    if u < 1_000_000:
        return f"{sign}{_decimal(u, 3)}µs"  # U+00B5, the sign Go prints
    if u < _NS_PER_S:
        return f"{sign}{_decimal(u, 6)}ms"
    # From a second on Go stops at hours (days differ in length) and always prints the
    # smaller units once a larger one is present: "1h0m0s".
    minutes, seconds_ns = divmod(u, 60 * _NS_PER_S)
    hours, minutes = divmod(minutes, 60)
    seconds = f"{_decimal(seconds_ns, 9)}s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return sign + seconds


def _utc(time_ns: int) -> tuple[datetime, int]:
    seconds, ns = divmod(time_ns, _NS_PER_S)
    return datetime.fromtimestamp(seconds, tz=UTC), ns


@functools.lru_cache(maxsize=4)  # records come in time order: a few seconds at a time
def _rfc3339_second(seconds: int) -> str:
    return f"{datetime.fromtimestamp(seconds, tz=UTC):%Y-%m-%dT%H:%M:%S}"


def rfc3339(time_ns: int) -> str:
    """RFC 3339 in UTC with all 9 fractional digits: "2024-09-14T08:19:26.552709932Z"."""
    seconds, ns = divmod(time_ns, _NS_PER_S)
    return f"{_rfc3339_second(seconds)}.{ns:09d}Z"


def go_time(time_ns: int) -> str:
    """Go's time.Time.String() in UTC, as the seed prints it: trailing zeros of the fraction
    dropped ("2024-09-14 08:19:26.5527 +0000 UTC"), no fraction for a whole second."""
    moment, ns = _utc(time_ns)
    fraction = f"{ns:09d}".rstrip("0")
    return f"{moment:%Y-%m-%d %H:%M:%S}{'.' + fraction if fraction else ''} +0000 UTC"


def fields(r: AccessRecord) -> dict[str, object]:
    """The JSON object of one record, keys in their documented order."""
    out: dict[str, object] = {
        "time": rfc3339(r.time_ns),
        "src.addr": r.src_addr,
        "src.workload": r.src_workload,
        "src.namespace": r.src_namespace,
        "dst.addr": r.dst_addr,
        "dst.service": r.dst_service,
        "dst.workload": r.dst_workload,
        "dst.namespace": r.dst_namespace,
        "direction": r.direction,
        "sent_bytes": r.sent_bytes,
        "received_bytes": r.received_bytes,
        "duration": go_duration(r.duration_ns),
        "duration_ns": r.duration_ns,
        "srtt_us": r.srtt_us,
        "min_rtt_us": r.min_rtt_us,
        "retransmits": r.retransmits,
        "segs_in": r.segs_in,
        "segs_out": r.segs_out,
    }
    if r.failure_reason is not None:
        out["failure_reason"] = r.failure_reason
    if r.periodic:
        out["report"] = "periodic"
    return out


def message(r: AccessRecord, f: dict[str, object] | None = None) -> str:
    """The seed's text: "src.addr=..., ..., duration=2.733902ms" (+ ", failure_reason=...");
    `f` is fields(r) when the caller has it already."""
    f = fields(r) if f is None else f
    extra = tuple(key for key in _OPTIONAL_KEYS if key in f)
    return ", ".join(f"{key}={f[key]}" for key in (*_MESSAGE_KEYS, *extra))


def text_line(time_ns: int, message_text: str) -> str:
    """The seed's whole line, as `kmeshd accesslog` prints it: "accesslog: <Go time> " and
    the record's message()."""
    return f"accesslog: {go_time(time_ns)} {message_text}"


def journal_key(key: str) -> str:
    """A JSON key as a journal field name: "dst.workload" -> "KMESHD_DST_WORKLOAD"."""
    return "KMESHD_" + key.upper().replace(".", "_")


# Every key of fields(), in its order.
JSON_KEYS = (
    "time", *_MESSAGE_KEYS, "duration_ns", "srtt_us", "min_rtt_us", "retransmits",
    "segs_in", "segs_out", *_OPTIONAL_KEYS,
)  # fmt: skip
_JOURNAL_KEYS = {key: journal_key(key) for key in JSON_KEYS}


def journal_fields(r: AccessRecord) -> dict[str, str]:
    """MESSAGE, MESSAGE_ID, SYSLOG_IDENTIFIER, PRIORITY, then every JSON key as KMESHD_*."""
    f = fields(r)
    out = {
        "MESSAGE": message(r, f),
        "MESSAGE_ID": MESSAGE_ID,
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "PRIORITY": PRIORITY_INFO,
    }
    out.update({_JOURNAL_KEYS[key]: str(value) for key, value in f.items()})
    return out
