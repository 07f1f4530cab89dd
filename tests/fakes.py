"""Stand-ins for the kernel edge and the clock, so the daemon's lifecycle and its publish
pipeline run in tests without root: a probe whose maps are dicts of the bytes the real
one would hand over (built with the layout's mirrors), and a clock that moves only when
the daemon sleeps."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kmeshd.config import Config
from kmeshd.events import encode_address
from kmeshd.kernel.layout import (
    BUCKETS,
    CONN_RECORD,
    FLOW_COUNTERS,
    FLOW_KEY,
    Direction,
    Entries,
    Kind,
    Stat,
)

ip = ipaddress.ip_address


def flow_key(
    client: str, server: str, port: int, direction: Direction, generation: int = 0
) -> bytes:
    """A struct flow_key as the kernel writes it."""
    return FLOW_KEY.codec.pack(
        encode_address(ip(client)), encode_address(ip(server)), port, direction, generation
    )


def flow_value(opened: int = 0, closed: int = 0, received: int = 0, sent: int = 0) -> bytes:
    """A struct flow_counters with these counts, the rest zero."""
    slots = [opened, closed, 0, received, sent] + [0] * (5 + 4 * (BUCKETS + 1))
    return FLOW_COUNTERS.codec.pack(*slots)


def conn_record(
    local: str, local_port: int, remote: str, remote_port: int, direction: Direction, **kw: int
) -> bytes:
    """A struct conn_record of a closed socket; `kw` sets other fields."""
    values: dict[str, object] = {name: 0 for name, _code in CONN_RECORD.fields}
    values |= dict(
        local=encode_address(ip(local)),
        remote=encode_address(ip(remote)),
        local_port=local_port,
        remote_port=remote_port,
        kind=Kind.CLOSED,
        direction=direction,
    )
    values |= kw
    return CONN_RECORD.codec.pack(*values.values())


class FakeProbe:
    """An attached probe over dicts: `flows_map` as the kernel's map holds it, `unseen` the
    closes waiting in unseen_closes, `open_now` established sockets by flow, `records`
    waiting in the ring buffer, `stats` as summed. `stuck`, when set, holds the next sweep
    until it is set free (a slow namespace, a loaded host)."""

    def __init__(self) -> None:
        self.flows_map: dict[bytes, bytes] = {}
        self.unseen: list[tuple[bytes, int]] = []
        self.open_now: dict[bytes, int] = {}
        self.generation = 0
        self.generations = 0  # how many times new_generation() ran
        self.flows_capacity = 65536
        self.origin = "fake flows map 1"  # a remade map gets another
        self.batch = 4096  # entries per batch read
        self.records: list[bytes] = []
        self.stats_values = {s: 0 for s in Stat}
        self.known: set[bytes] = set()
        self.known_capacity = 1_000_000
        self.settings: dict[str, object] = {}
        self.callback: Callable[[bytes], bool] | None = None
        self.sweeps = 0
        self.unreached = 0
        self.closed: bool | None = None  # None: open; else whether it detached
        self.stuck: threading.Event | None = None
        self.in_sweep = threading.Event()
        self.can_sweep = True

    def on_record(self, callback: Callable[[bytes], bool]) -> None:
        self.callback = callback

    def keys_at_start(self) -> set[bytes]:
        return set(self.flows_map)  # no program attaches here: the map as it is

    def drain(self) -> None:
        assert self.callback is not None
        while self.records:
            if not self.callback(self.records.pop(0)):
                break

    def sweep(self) -> None:
        self.in_sweep.set()
        if self.stuck is not None:
            assert self.stuck.wait(30)
        self.sweeps += 1

    def flow_entries(self) -> Iterator[Entries]:
        """The map in batches of `batch` entries, as the kernel hands them over."""
        items = list(self.flows_map.items())
        for at in range(0, len(items), self.batch):
            part = items[at : at + self.batch]
            yield Entries(b"".join(k for k, _ in part), b"".join(v for _, v in part), len(part))

    def open_connections(self) -> dict[bytes, int]:
        return dict(self.open_now)

    def take_unseen_closes(self) -> list[tuple[bytes, int]]:
        taken, self.unseen = self.unseen, []
        return taken

    def new_generation(self) -> int:
        self.generation = (self.generation + 1) % 256
        self.generations += 1
        return self.generation

    def forget_flows(self, keys: bytes) -> int:
        size = FLOW_KEY.size
        gone = [keys[at : at + size] for at in range(0, len(keys), size)]
        return sum(self.flows_map.pop(key, None) is not None for key in gone)

    def stats(self) -> dict[Stat, int]:
        return dict(self.stats_values)

    def set_known(self, keys: Iterable[bytes]) -> int:
        wanted = sorted(set(keys))
        self.known = set(wanted[: self.known_capacity])
        return len(wanted) - len(self.known)

    def want_records(self, on: bool) -> None:
        self.settings["records"] = on

    def want_live_updates(self, on: bool) -> None:
        self.settings["live_updates"] = on

    def want_periodic_records(self, seconds: float) -> None:
        self.settings["periodic"] = seconds

    def close(self, detach: bool = True) -> None:
        self.closed = detach


class FakeKernel:
    """Hands out one FakeProbe; `cgroup_dir` is what bpf.cgroup resolves to."""

    def __init__(self, cgroup_dir: Path) -> None:
        self.cgroup_dir = cgroup_dir
        self.probe = FakeProbe()
        self.phases: list[str] = []
        self.on_start: Callable[[], None] = lambda: None  # runs as bcc would compile

    def cgroup(self, config: Config) -> Path:
        return self.cgroup_dir

    def start(self, config: Config, cgroup: Path, phase: Callable[[str], None]) -> FakeProbe:
        phase("compiling the BPF probe")
        self.on_start()
        self.probe.can_sweep = config.bpf.live_updates
        return self.probe


class FakeClock:
    """Monotonic time from 1000 s, wall time WALL_NS ahead of it; both move only in
    sleep(), which then calls `on_sleep` (a test's way to act between two ticks). Kept in
    integer nanoseconds, as the kernel's clock is."""

    WALL_NS = 1_700_000_000 * 10**9

    def __init__(self) -> None:
        self.now_ns = 1000 * 10**9
        self.on_sleep: Callable[[], None] = lambda: None

    def monotonic(self) -> float:
        return self.now_ns / 1e9

    def monotonic_ns(self) -> int:
        return self.now_ns

    def time(self) -> float:
        return self.time_ns() / 1e9

    def time_ns(self) -> int:
        return self.WALL_NS + self.now_ns

    def sleep(self, seconds: float, /) -> None:
        self.now_ns += round(seconds * 1e9)
        self.on_sleep()
