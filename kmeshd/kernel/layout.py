"""The Python side of bpf/tcp_probe.h: every constant and struct the probe and user space share.

Pure: no bcc, no ctypes. The header is the one source; this module mirrors it, and
tests/test_layout.py compiles the header with the C compiler and compares every
`#define` and every field's offset and size with what is here, so a change on one side
alone fails. Change both together, and bump LAYOUT when a struct changes: the pinned maps
live under <pin_dir>/v<LAYOUT>, so a daemon never reads maps of another layout.

    C (bpf/tcp_probe.h)           Python (here)
    KMESHD_LAYOUT                 LAYOUT
    DIR_*, KIND_*, REASON_*       Direction, Kind, Reason
    STAT_*, SETTING_*             Stat, Setting (indexes of the stats and settings arrays)
    SF_*, RECORD_*                SockFlag, RecordFlag
    BUCKETS, *_BOUNDS_US(X)       BUCKETS, LATENCY_BOUNDS_US, DURATION_BOUNDS_US
    struct flow_key, ...          FLOW_KEY, FLOW_COUNTERS, HISTOGRAM, SOCK_STATE, CONN_RECORD
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

LAYOUT = 8


class Direction(enum.IntEnum):
    """flow_key.direction: which end of the connection the reporting socket is."""

    OUTBOUND = 1  # this socket connected: the client side
    INBOUND = 2  # this socket was accepted: the server side


class Kind(enum.IntEnum):
    """conn_record.kind"""

    CLOSED = 1
    FAILED = 2
    PROGRESS = 3  # an open connection's totals so far (accesslog.periodic)


class Reason(enum.IntEnum):
    """conn_record.reason: why a connect failed."""

    NONE = 0
    REFUSED = 1
    TIMEOUT = 2
    OTHER = 3


class Stat(enum.IntEnum):
    """Indexes of the per-CPU `stats` array."""

    OPENED = 0
    CLOSED = 1
    FAILED = 2
    UNATTRIBUTED = 3
    RINGBUF_LOST = 4
    FLOWS_FULL = 5
    SOCKS_FULL = 6
    SWEEP_BUSY = 7


class Setting(enum.IntEnum):
    """Indexes of the `settings` array user space writes."""

    RECORDS = 0  # 1 while an access log wants records
    PERIODIC = 1  # ns between two records of one open connection; 0: none
    GENERATION = 2  # the generation flows are counted in now
    SWEEP_PASS = 3  # which sweep pass runs now
    OPENED = 4  # 1 once a daemon opened this load's pins


class SockFlag(enum.IntFlag):
    """sock_state.flags"""

    ESTABLISHED = 1
    RTO_EXPIRED = 2
    RESET = 4


class RecordFlag(enum.IntFlag):
    """conn_record.flags"""

    RESET = 1  # a RST was received before the close


# Histogram bucket upper bounds in microseconds, and the buckets per histogram: one per
# bound, and one for what lies above the last.
LATENCY_BOUNDS_US = (
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
)  # fmt: skip
DURATION_BOUNDS_US = (
    500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000, 10_000_000,
    30_000_000, 60_000_000, 300_000_000, 600_000_000, 1_800_000_000, 3_600_000_000,
    14_400_000_000,
)  # fmt: skip
BUCKETS = 18

# Each enum above is a family of #defines sharing a prefix.
_PREFIXES: tuple[tuple[str, type[enum.IntEnum] | type[enum.IntFlag]], ...] = (
    ("DIR_", Direction),
    ("KIND_", Kind),
    ("REASON_", Reason),
    ("STAT_", Stat),
    ("SETTING_", Setting),
    ("SF_", SockFlag),
    ("RECORD_", RecordFlag),
)


def defines() -> dict[str, int]:
    """Every integer #define of the header, as this module has it."""
    out = {"KMESHD_LAYOUT": LAYOUT, "BUCKETS": BUCKETS}
    for prefix, members in _PREFIXES:
        out |= {f"{prefix}{m.name}": int(m.value) for m in members}
    out["STAT_COUNT"] = len(Stat)
    out["SETTING_COUNT"] = len(Setting)
    return out


@dataclass(frozen=True)
class Mirror:
    """How Python reads one C struct: its fields in order, each a `struct` module code
    ("Q", "16s"; "19Q" for an array or an embedded struct of __u64s). The header keeps
    every field naturally aligned, with explicit padding, so the packed format has the
    C layout. `codec` unpacks a whole struct in one call (the hot paths use it)."""

    c_name: str
    fields: tuple[tuple[str, str], ...]
    codec: struct.Struct = field(init=False, repr=False)

    def __post_init__(self) -> None:
        codes = "".join(code for _name, code in self.fields)
        object.__setattr__(self, "codec", struct.Struct("=" + codes))

    @property
    def size(self) -> int:
        return self.codec.size

    def places(self) -> dict[str, tuple[int, int]]:
        """field -> (offset, size) in bytes."""
        out, offset = {}, 0
        for name, code in self.fields:
            size = struct.calcsize("=" + code)
            out[name] = (offset, size)
            offset += size
        return out

    def integer(self, data: bytes, name: str) -> int:
        """One integer field of a struct in `data`."""
        value = self._read(data, name)
        assert isinstance(value, int), name
        return value

    def raw(self, data: bytes, name: str) -> bytes:
        """The bytes of one field of a struct in `data` (an address, an embedded key)."""
        offset, size = self.places()[name]
        return bytes(data[offset : offset + size])

    def _read(self, data: bytes, name: str) -> object:
        offset, _size = self.places()[name]
        (value,) = struct.unpack_from("=" + dict(self.fields)[name], data, offset)
        return value


_HISTOGRAM_SLOTS = f"{BUCKETS + 1}Q"  # the buckets, then the sum

FLOW_KEY = Mirror(
    "flow_key",
    (
        ("client", "16s"),
        ("server", "16s"),
        ("server_port", "H"),
        ("direction", "B"),
        ("generation", "B"),
    ),
)
HISTOGRAM = Mirror("histogram", (("buckets", f"{BUCKETS}Q"), ("sum_us", "Q")))
FLOW_COUNTERS = Mirror(
    "flow_counters",
    (
        *((name, "Q") for name in (
            "opened", "closed", "failed", "received_bytes", "sent_bytes", "reset", "refused",
            "timeout", "retransmits", "lost",
        )),
        *((name, _HISTOGRAM_SLOTS) for name in ("duration", "srtt", "min_rtt", "connect")),
    ),
)  # fmt: skip
SOCK_STATE = Mirror(
    "sock_state",
    (
        ("key", f"{FLOW_KEY.size}s"),
        ("flags", "H"),
        ("client_port", "H"),
        ("start_ns", "Q"),
        ("established_ns", "Q"),
        ("reported_sent", "Q"),
        ("reported_received", "Q"),
        ("last_record_ns", "Q"),
        ("reported_retrans", "Q"),
        ("reported_lost", "Q"),
        ("swept", "I"),
        ("swept_segs", "I"),
    ),
)
CONN_RECORD = Mirror(
    "conn_record",
    (
        ("time_ns", "Q"),
        ("duration_ns", "Q"),
        ("received_bytes", "Q"),
        ("sent_bytes", "Q"),
        ("local", "16s"),
        ("remote", "16s"),
        ("local_port", "H"),
        ("remote_port", "H"),
        ("kind", "B"),
        ("direction", "B"),
        ("reason", "B"),
        ("flags", "B"),
        ("srtt_us", "I"),
        ("min_rtt_us", "I"),
        ("total_retrans", "I"),
        ("segs_in", "I"),
        ("segs_out", "I"),
        ("_pad", "I"),
    ),
)
MIRRORS = (FLOW_KEY, HISTOGRAM, FLOW_COUNTERS, SOCK_STATE, CONN_RECORD)


class Entries(NamedTuple):
    """A map's entries as read in one batch: `total` keys laid end to end, and as many
    values (each as its mirror lays it out)."""

    keys: bytes
    values: bytes
    total: int


def without_generation(key: bytes) -> bytes:
    """A flow key with its generation byte zeroed: the flow, whatever its generation."""
    return key[:-1] + b"\0"
