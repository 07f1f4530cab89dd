"""The probe as the daemon holds it: what `kmeshd load` (kernel.load) pinned, opened by path.

    Probe.open()    the pins under <pin_dir>/v<LAYOUT>, checked against the config
    drain()         ring-buffer records -> the callback (the access log)
    sweep()         the socket iterator: open connections' bytes into the flows
    flow_entries(), open_connections(), take_unseen_closes(), stats()
                    map contents for a publish, in batches
    new_generation(), forget_flows()      flow expiry (see struct flow_key in tcp_probe.h)
    set_known(), want_*()                 what the kernel tracks and sends
    close()         detach (clean stop) or let go (the pinned link keeps counting)

Opening a pin (BPF_OBJ_GET) and using a map, a ring buffer or an iterator by its file
descriptor need no capability beyond CAP_BPF (none at all from Linux 6.5), so the daemon
runs without the ones loading takes. Everything crosses as bytes; kmeshd.events decodes.
Nothing outside this package imports bcc or ctypes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kmeshd.config import Config
from kmeshd.errors import UnavailableError
from kmeshd.kernel import cgroup
from kmeshd.kernel.attach import run_iterator
from kmeshd.kernel.layout import (
    FLOW_KEY,
    SOCK_STATE,
    Entries,
    Setting,
    SockFlag,
    Stat,
    without_generation,
)
from kmeshd.kernel.libbpf import BatchReader, LibBpf, RawMap, RingBuffer, possible_cpus
from kmeshd.kernel.load import LINK_PIN, SWEEP_PIN, load, may_load
from kmeshd.kernel.pins import layout_dir

log = logging.getLogger(__name__)

# Of a struct sock_state: its flow key, flags, establishment and last sweep pass.
_SOCKET_FLOW = struct.Struct(f"={FLOW_KEY.size}sH2x8xQ40xI4x")
assert _SOCKET_FLOW.size == SOCK_STATE.size
assert SOCK_STATE.places()["flags"] == (FLOW_KEY.size, 2)
assert SOCK_STATE.places()["established_ns"][0] == FLOW_KEY.size + 12
assert SOCK_STATE.places()["swept"][0] == SOCK_STATE.size - 8
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
MAPS = (
    "flows", "socks", "unseen_closes", "known_addrs", "stats", "settings", "grace",
    "grace_inner", "records", "kept",
)  # fmt: skip
NOT_LOADED = "run kmeshd load as root first (the unit does, ExecStartPre=)"


def flows_origin(libbpf: LibBpf, fd: int, pin: Path) -> str:
    """Names the flows map, so that counters saved against it are known to be its: its id,
    and when its pin was made (ids start over at each boot; the pin's time does not)."""
    return f"{libbpf.map_id(fd)}@{pin.stat().st_ctime_ns}"


def _keys(reader: BatchReader) -> set[bytes]:
    """Every key of a map, as laid out in its batches."""
    size = reader.key_size
    return {
        keys[at : at + size]
        for keys, _values, total in reader.batches()
        for at in range(0, total * size, size)
    }


class Probe:
    """An attached probe's pins, open. Build it with `Probe.open(...)`."""

    def __init__(self, libbpf: LibBpf, pins: Path, fds: dict[str, int], link_fd: int) -> None:
        self._libbpf, self._pins, self._fds = libbpf, pins, fds
        self.origin = flows_origin(libbpf, fds["flows"], pins / "flows")  # see carryover
        self._sweep_pin = pins / SWEEP_PIN if (pins / SWEEP_PIN).exists() else None
        self._sweeping = False
        self._pass = random.getrandbits(32)  # a socket's last pass is never taken for ours
        self._swept_at: int | None = None  # CLOCK_MONOTONIC ns when the last sweep began
        self.unreached = 0  # open sockets the last sweep could not read (see sweep)
        self._link_fd = link_fd
        self._flows = BatchReader(libbpf, fds["flows"])
        self.flows_capacity = self._flows.capacity
        self._socks = BatchReader(libbpf, fds["socks"])
        self._unseen = BatchReader(libbpf, fds["unseen_closes"])
        self._known = RawMap(libbpf, fds["known_addrs"])
        self._known_have: set[bytes] | None = None  # what set_known put in the map
        self._stats = RawMap(libbpf, fds["stats"])
        self._cpus = possible_cpus()
        self._settings = RawMap(libbpf, fds["settings"])
        self._ring: RingBuffer | None = None
        # What the settings say: a new load's program starts at 0, and goes on from where
        # the last daemon left it when this one opens the same load's pins again.
        self.generation = self._get(Setting.GENERATION)
        self._reopened = self._get(Setting.OPENED) == 1  # no load since the last daemon
        self._set(Setting.OPENED, 1)
        self._kept: set[bytes] | None = None  # see keys_at_start

    @classmethod
    def open(cls, pin_dir: Path, cgroup_dir: Path, sweep: bool, max_flows: int) -> Probe:
        """The pins `kmeshd load` made for this config; UnavailableError says what to run
        when there are none, or they belong to another config."""
        pins = layout_dir(pin_dir)
        libbpf = LibBpf()
        fds: dict[str, int] = {}
        try:
            for name in (*MAPS, LINK_PIN):
                fds[name] = libbpf.open_pinned(pins / name)
            link_fd = fds.pop(LINK_PIN)
            if libbpf.link_cgroup_id(link_fd) != os.stat(cgroup_dir).st_ino:
                raise UnavailableError(f"the probe in {pins} is not attached to {cgroup_dir}")
        except (OSError, UnavailableError) as exc:
            for fd in fds.values():
                os.close(fd)
            raise UnavailableError(f"no probe loaded for this config ({exc}): {NOT_LOADED}") from (
                exc
            )
        probe = cls(libbpf, pins, fds, link_fd)
        problem = probe._mismatch(sweep, max_flows)
        if problem:
            probe.close(detach=False)
            raise UnavailableError(f"{problem}: {NOT_LOADED}")
        return probe

    def _mismatch(self, sweep: bool, max_flows: int) -> str | None:
        if self.flows_capacity != max_flows:
            return f"the probe was loaded with bpf.max_flows = {self.flows_capacity}"
        if sweep and self._sweep_pin is None:
            return "the probe was loaded without its socket sweep (bpf.live_updates)"
        return None

    def keys_at_start(self) -> set[bytes]:
        """The flow keys the pinned map held before this probe attached (once; then empty).
        Only an earlier daemon's program wrote those; what a new program counts starts at
        generation 0, which may be a key an earlier daemon deleted. `kmeshd load` left
        them in the `kept` map. Pins a daemon opened before, with no load since, hold the
        same program's entries only: all of them."""
        if self._kept is not None:
            return set()
        if self._reopened:
            self._kept = _keys(self._flows)
            return self._kept
        kept = BatchReader(self._libbpf, self._fds["kept"])
        self._kept = _keys(kept)
        kept.delete(b"".join(self._kept))
        return self._kept

    def on_record(self, callback: Callable[[bytes], bool]) -> None:
        """Call `callback(raw record)` for each ring-buffer record drain() consumes; when it
        returns False, drain() stops and the rest stay queued in the kernel."""
        self._ring = RingBuffer(self._fds["records"], callback)

    def drain(self) -> None:
        """Hand every queued record to the callback (until it says stop); never waits."""
        if self._ring is not None:
            self._ring.consume()

    def flow_entries(self) -> Iterator[Entries]:
        """The flows map, a batch at a time: struct flow_key and struct flow_counters."""
        for batch in self._flows.batches():
            yield Entries(*batch)

    def open_connections(self) -> dict[bytes, int]:
        """Established tracked sockets by flow key (generation 0): the connections open now.
        Counted from the sockets themselves, so it needs no history of opens and closes.
        Sets `unreached`: those established before the last sweep that it did not read."""
        open_by_flow: dict[bytes, int] = {}
        swept_at, this_pass = self._swept_at, self._pass
        unreached = 0
        for _keys, values, _count in self._socks.batches():
            for key, flags, established, swept in _SOCKET_FLOW.iter_unpack(values):
                if flags & SockFlag.ESTABLISHED:
                    open_by_flow[key] = open_by_flow.get(key, 0) + 1
                    if swept_at is not None and established < swept_at and swept != this_pass:
                        unreached += 1
        self.unreached = unreached
        return open_by_flow

    def take_unseen_closes(self) -> list[tuple[bytes, int]]:
        """Closes the closed-socket sweep counted (kernel.stale), by flow key (generation
        0), each taken out of the map: a close is handed over once."""
        keys, values, count = self._unseen.read()
        self._unseen.delete(keys)
        closes = struct.unpack(f"={count}Q", values)
        size = FLOW_KEY.size
        return [
            (without_generation(keys[i * size : (i + 1) * size]), closes[i]) for i in range(count)
        ]

    def new_generation(self) -> int:
        """Count flows in a new generation from now on, and return once no program can still
        be writing the old one (an update of a map-in-map waits for every running program,
        the kernel's synchronize_rcu). Returns the new generation."""
        self.generation = (self.generation + 1) % 256
        self._set(Setting.GENERATION, self.generation)
        grace = RawMap(self._libbpf, self._fds["grace"])
        grace.update(_U32.pack(0), _U32.pack(self._fds["grace_inner"]))
        return self.generation

    def forget_flows(self, keys: bytes) -> int:
        """Delete the flow entries whose keys `keys` holds end to end; returns how many."""
        return self._flows.delete(keys)

    def stats(self) -> dict[Stat, int]:
        """The per-CPU counters, summed."""
        return {s: self._stats.per_cpu_sum(_U32.pack(s), self._cpus) for s in Stat}

    def want_records(self, on: bool) -> None:
        """Whether the kernel queues access-log records at all (off: no ring work)."""
        self._set(Setting.RECORDS, int(on))

    @property
    def can_sweep(self) -> bool:
        """Whether the probe was loaded with its socket sweep."""
        return self._sweep_pin is not None

    def want_live_updates(self, on: bool) -> None:
        """Whether sweep() adds open connections' bytes to the flows (else: at close)."""
        self._sweeping = on and self.can_sweep

    def sweep(self) -> None:
        """Bring every open tracked connection's bytes, retransmits and losses into the
        flows (and write due periodic records), in every network namespace at once: the
        iterator reaches sockets through the files processes hold (see bpf/tcp_probe.c).
        Those it cannot reach are counted in `unreached` by the next open_connections()."""
        pin = self._sweep_pin
        if not self._sweeping or pin is None:
            self._swept_at = None
            return
        self._pass = (self._pass + 1) & 0xFFFFFFFF
        self._set(Setting.SWEEP_PASS, self._pass)
        self._swept_at = time.monotonic_ns()  # bpf_ktime_get_ns()'s clock
        run_iterator(pin)

    def want_periodic_records(self, seconds: float) -> None:
        """A record of each open connection's totals every `seconds` it moves bytes; 0: none."""
        self._set(Setting.PERIODIC, round(seconds * 1e9))

    def _set(self, index: Setting, value: int) -> None:
        self._settings.update(_U32.pack(index), _U64.pack(value))

    def _get(self, index: Setting) -> int:
        value = self._settings.lookup(_U32.pack(index))
        return _U64.unpack(value)[0] if value is not None else 0

    def set_known(self, keys: Iterable[bytes]) -> int:
        """Make the kernel's known-address set equal `keys` (addresses as the kernel keeps
        them, see kmeshd.events.encode_address); returns the entries refused."""
        want = set(keys)
        if self._known_have is None:  # once: the map may hold a previous instance's set
            self._known_have = set(self._known)
        have = self._known_have
        for raw in have - want:
            self._known.delete(raw)
            have.discard(raw)
        refused = 0
        for raw in want - have:
            try:
                self._known.update(raw, b"\x01")
                have.add(raw)
            except OSError:  # the map is full: count, keep the rest working
                refused += 1
        return refused

    def close(self, detach: bool = True) -> None:
        """Detach (clean stop) or just let go (the pinned link keeps counting). A detached
        link's pin stays: the next `kmeshd load` replaces it."""
        if detach:
            self._libbpf.link_detach(self._link_fd)
        if self._ring is not None:
            self._ring.close()
        os.close(self._link_fd)
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}


class HostKernel:
    """This host's kernel, as the daemon starts its probe on it: loaded in-process when
    this process may (root in a shell, the tests), else what `kmeshd load` left."""

    def cgroup(self, config: Config) -> Path:
        return cgroup.directory(config.bpf.cgroup, f"{config.path}: bpf.cgroup")

    def start(self, config: Config, cgroup: Path, phase: Callable[[str], None]) -> Probe:
        pin_dir = Path(config.bpf.pin_dir)
        bpf = config.bpf
        if may_load():
            load(pin_dir, cgroup, phase, bpf.live_updates, bpf.max_flows)
        return Probe.open(pin_dir, cgroup, bpf.live_updates, bpf.max_flows)
