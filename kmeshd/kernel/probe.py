"""The probe as the daemon holds it: a thin facade over the kernel package.

    Probe.start()   host checks, BTF defines, compile (build), closed-socket sweep (stale),
                    attach (attach), all under <pin_dir>/v<LAYOUT> (pins)
    drain()         ring-buffer records -> the callback (the access log)
    sweep()         the TCP iterator in every network namespace: open connections' bytes
    flow_entries(), open_connections(), take_unseen_closes(), stats()
                    map contents for a publish, in batches
    new_generation(), forget_flows()      flow expiry (see struct flow_key in tcp_probe.h)
    set_known(), want_*()                 what the kernel tracks and sends
    close()         detach (clean stop) or let go (the pinned link keeps counting)

Everything crosses as bytes; kmeshd.events decodes. The only importer of bcc is here and
in build/attach, and nothing outside this package imports bcc or ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from kmeshd.config import Config
from kmeshd.errors import UnavailableError
from kmeshd.kernel import cgroup, sockdiag
from kmeshd.kernel.attach import PROGRAM, attach, attach_sweep, run_iterator
from kmeshd.kernel.build import check_host, compile_probe, import_bcc, kernel_defines
from kmeshd.kernel.layout import (
    FLOW_KEY,
    SOCK_STATE,
    Entries,
    Setting,
    SockFlag,
    Stat,
    without_generation,
)
from kmeshd.kernel.libbpf import BatchReader, LibBpf, RawMap
from kmeshd.kernel.pins import prepare_pin_dir
from kmeshd.kernel.stale import may_enter_namespaces, sweep_closed_sockets

log = logging.getLogger(__name__)

# Of a struct sock_state: its flow key and its flags, the rest skipped.
assert SOCK_STATE.places()["flags"] == (FLOW_KEY.size, 2)
_SOCKET_FLOW = struct.Struct(f"={FLOW_KEY.size}sH{SOCK_STATE.size - FLOW_KEY.size - 2}x")


def flows_origin(libbpf: LibBpf, fd: int, pin: Path) -> str:
    """Names the flows map, so that counters saved against it are known to be its: its id,
    and when its pin was made (ids start over at each boot; the pin's time does not)."""
    return f"{libbpf.map_id(fd)}@{pin.stat().st_ctime_ns}"


def _keys(reader: BatchReader) -> set[bytes]:
    """Every key of a flows map, as laid out in its batches."""
    size = FLOW_KEY.size
    return {
        keys[at : at + size]
        for keys, _values, total in reader.batches()
        for at in range(0, total * size, size)
    }


class Probe:
    """A compiled, attached probe. Build it with `Probe.start(...)`."""

    def __init__(
        self,
        bpf: Any,
        libbpf: LibBpf,
        link_fd: int,
        link_pin: Path,
        sweep_link: int | None,
        origin: str = "",
    ) -> None:
        self._bpf = bpf
        self.origin = origin  # which flows map this is (see flows_origin)
        self._sweep_link = sweep_link
        self._sweeping = False
        self._libbpf = libbpf
        self._link_fd = link_fd
        self._link_pin = link_pin
        self._flows = BatchReader(libbpf, bpf["flows"].map_fd)
        self.flows_capacity = self._flows.capacity
        self._socks = BatchReader(libbpf, bpf["socks"].map_fd)
        self._unseen = BatchReader(libbpf, bpf["unseen_closes"].map_fd)
        self._grace = (bpf["grace"].map_fd, bpf["grace_inner"].map_fd)
        self.generation = 0  # what the settings say (a new program's start at 0)
        self._known = bpf["known_addrs"]
        self._known_have: set[bytes] | None = None  # what set_known put in the map
        self._stats = bpf["stats"]
        self._settings = bpf["settings"]
        self._kept: set[bytes] = set()  # see keys_at_start

    @classmethod
    def start(
        cls,
        pin_dir: Path,
        cgroup_dir: Path,
        phase: Callable[[str], None] = lambda _: None,
        sweep: bool = True,
        max_flows: int = 65536,
    ) -> Probe:
        """Compile, load and attach; `phase` hears what it is doing (for STATUS=). Without
        `sweep`, open connections' bytes count at their close only."""
        check_host(sweep=sweep)
        bcc = import_bcc()
        pins = prepare_pin_dir(pin_dir, max_flows)
        defines = kernel_defines(sweep)
        phase("compiling the BPF probe")
        bpf = compile_probe(bcc, pins, defines, max_flows)
        sweep_link = attach_sweep(bcc, bpf) if sweep else None
        libbpf = LibBpf()
        _forget_closed_sockets(bpf, libbpf)
        kept = _keys(BatchReader(libbpf, bpf["flows"].map_fd))
        phase(f"attaching the probe to {cgroup_dir}")
        prog = bpf.load_func(PROGRAM, bcc.BPF.SOCK_OPS)
        try:
            link_fd = attach(libbpf, prog.fd, cgroup_dir, pins / "link")
        except OSError as exc:
            bpf.cleanup()
            raise UnavailableError(f"cannot attach the probe to {cgroup_dir}: {exc}") from exc
        origin = flows_origin(libbpf, bpf["flows"].map_fd, pins / "flows")
        probe = cls(bpf, libbpf, link_fd, pins / "link", sweep_link, origin)
        probe._kept = kept
        return probe

    def keys_at_start(self) -> set[bytes]:
        """The flow keys the pinned map held before this probe attached (once; then empty).
        Only an earlier daemon's program wrote those; what this one counts starts at
        generation 0, which may be a key an earlier daemon deleted."""
        kept, self._kept = self._kept, set()
        return kept

    def on_record(self, callback: Callable[[bytes], bool]) -> None:
        """Call `callback(raw record)` for each ring-buffer record drain() consumes; when it
        returns False, drain() stops and the rest stay queued in the kernel."""

        def _cb(_ctx: Any, data: Any, size: int) -> int:
            return 0 if callback(ctypes.string_at(data, size)) else -1

        self._bpf["records"].open_ring_buffer(_cb)

    def drain(self) -> None:
        """Hand every queued record to the callback (until it says stop); never waits."""
        self._bpf.ring_buffer_consume()

    def flow_entries(self) -> Iterator[Entries]:
        """The flows map, a batch at a time: struct flow_key and struct flow_counters."""
        for batch in self._flows.batches():
            yield Entries(*batch)

    def open_connections(self) -> dict[bytes, int]:
        """Established tracked sockets by flow key (generation 0): the connections open now.
        Counted from the sockets themselves, so it needs no history of opens and closes."""
        open_by_flow: dict[bytes, int] = {}
        for _keys, values, _count in self._socks.batches():
            for key, flags in _SOCKET_FLOW.iter_unpack(values):
                if flags & SockFlag.ESTABLISHED:
                    open_by_flow[key] = open_by_flow.get(key, 0) + 1
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
        grace, inner = self._grace
        key, fd = ctypes.c_uint32(0), ctypes.c_uint32(inner)
        ret = self._libbpf.map_update_elem(grace, ctypes.byref(key), ctypes.byref(fd), 0)
        self._libbpf.check(ret, "bpf_map_update_elem grace")
        return self.generation

    def forget_flows(self, keys: bytes) -> int:
        """Delete the flow entries whose keys `keys` holds end to end; returns how many."""
        return self._flows.delete(keys)

    def stats(self) -> dict[Stat, int]:
        """The per-CPU counters, summed."""
        return {s: sum(self._stats[ctypes.c_int(s)]) for s in Stat}

    def want_records(self, on: bool) -> None:
        """Whether the kernel queues access-log records at all (off: no ring work)."""
        self._set(Setting.RECORDS, int(on))

    @property
    def can_sweep(self) -> bool:
        """Whether the probe was started with its socket sweep."""
        return self._sweep_link is not None

    def want_live_updates(self, on: bool) -> None:
        """Whether sweep() adds open connections' bytes to the flows (else: at close)."""
        self._sweeping = on and self.can_sweep

    def sweep(self, on_error: Callable[[sockdiag.SockDiagError], None]) -> int:
        """Bring every open tracked connection's bytes, retransmits and losses into the
        flows (and write due periodic records), in each network namespace this process may
        enter; `on_error` hears of those it may not. Returns the namespaces swept."""
        link = self._sweep_link
        if not self._sweeping or link is None:
            return 0
        swept, _hidden = sockdiag.in_each_namespace(lambda: run_iterator(link), on_error)
        return len(swept)

    def want_periodic_records(self, seconds: float) -> None:
        """A record of each open connection's totals every `seconds` it moves bytes; 0: none."""
        self._set(Setting.PERIODIC, round(seconds * 1e9))

    def _set(self, index: Setting, value: int) -> None:
        self._settings[ctypes.c_int(index)] = ctypes.c_uint64(value)

    def set_known(self, keys: Iterable[bytes]) -> int:
        """Make the kernel's known-address set equal `keys` (addresses as the kernel keeps
        them, see kmeshd.events.encode_address); returns the entries refused."""
        want = set(keys)
        if self._known_have is None:  # once: the map may hold a previous instance's set
            self._known_have = {bytes(k) for k in self._known}
        have = self._known_have
        key_type, leaf_type = self._known.Key, self._known.Leaf
        for raw in have - want:
            with contextlib.suppress(KeyError):
                del self._known[key_type.from_buffer_copy(raw)]
            have.discard(raw)
        refused = 0
        for raw in want - have:
            try:
                self._known[key_type.from_buffer_copy(raw)] = leaf_type(1)
                have.add(raw)
            except Exception:  # the map is full: count, keep the rest working
                refused += 1
        return refused

    def close(self, detach: bool = True) -> None:
        """Detach (clean stop) or just let go (the pinned link keeps counting)."""
        if detach:
            self._libbpf.link_detach(self._link_fd)
            self._link_pin.unlink(missing_ok=True)
        os.close(self._link_fd)
        if self._sweep_link is not None:
            os.close(self._sweep_link)
        self._bpf.cleanup()


def _forget_closed_sockets(bpf: Any, libbpf: LibBpf) -> None:
    """Sweep out sockets that closed while no probe ran, if this process may look into
    every network namespace; else `kmeshd sweep-sockets` does it."""
    if not may_enter_namespaces():
        log.info(
            "sockets that closed while kmeshd was stopped are left to `kmeshd"
            " sweep-sockets` (the unit runs it privileged): this process may not enter"
            " other network namespaces (CAP_SYS_ADMIN, CAP_SYS_PTRACE)"
        )
        return
    sweep_closed_sockets(
        RawMap(libbpf, bpf["socks"].map_fd),
        RawMap(libbpf, bpf["unseen_closes"].map_fd),
        sockdiag.live_cookies,
    )


class HostKernel:
    """This host's kernel, as the daemon starts its probe on it."""

    def cgroup(self, config: Config) -> Path:
        return cgroup.directory(config.bpf.cgroup, f"{config.path}: bpf.cgroup")

    def start(self, config: Config, cgroup: Path, phase: Callable[[str], None]) -> Probe:
        pin_dir = Path(config.bpf.pin_dir)
        bpf = config.bpf
        return Probe.start(pin_dir, cgroup, phase, bpf.live_updates, bpf.max_flows)
