"""The kernel edge: compile, attach, read and detach the TCP probe. The only bcc importer.

Kernel state outlives the process. The maps are pinned under `<pin_dir>/v<LAYOUT>/` and
the program is attached through a pinned bpf_link, so a restarted daemon re-opens the
same counters and *replaces* its predecessor's program in one step (bpf_link_update):
never two programs counting every connection twice, never a moment with none. A
link-based cgroup attachment is always "multi", so other sock_ops users in this or any
lower cgroup keep working. bcc has no link API, hence the few libbpf calls via ctypes.

Open connections' bytes reach the flows through the socket sweep: a TCP iterator program
that `Probe.sweep()` runs in every network namespace before each publish.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from kmeshd import btf, cgroup, sockdiag
from kmeshd.errors import UnavailableError
from kmeshd.events import LAYOUT, SF_ESTABLISHED, SockStateStruct, Stat, encode_address
from kmeshd.identity.model import IPAddress

log = logging.getLogger("kmeshd")

FLOWS_MAX = 65536  # (client, server, port, direction); allocated as used, ~750 bytes each
KNOWN_MAX = 65536
SOCKS_MAX = 131072  # tracked sockets open at once; preallocated: 21 MiB of kernel memory
RINGBUF_PAGES = 1024  # 4 MiB: about 40,000 records between two polls
BPF_CGROUP_SOCK_OPS = 3  # enum bpf_attach_type
PROGRAM = "kmeshd_sockops"
BPF_FS_MAGIC = 0xCAFE4A11
SETTING_RECORDS, SETTING_PERIODIC = 0, 1  # the probe's settings array
SWEEP_PROGRAM = "bpf_iter__tcp"  # bcc attaches an iterator by its name: bpf_iter__<target>
# The struct tcp_sock fields the probe reads, each as the -D define that carries its offset
# into the probe, its member path, and the size the probe reads. At every close:
CLOSE_FIELDS = {
    "SOCK_FLAGS_OFF": ("inet_conn.icsk_inet.sk.__sk_common.skc_flags", 8),  # sk_flags
}
# Enum members the probe tests, each as its -D define: SOCK_DONE is the sk_flags bit that
# tcp_fin() sets as it takes the peer's FIN.
ENUM_VALUES = {"SOCK_DONE_BIT": ("sock_flags", "SOCK_DONE")}
# And in the socket sweep (bpf.live_updates):
SWEEP_FIELDS = {
    "TCP_STATE_OFF": ("inet_conn.icsk_inet.sk.__sk_common.skc_state", 1),
    "TCP_BYTES_ACKED_OFF": ("bytes_acked", 8),
    "TCP_BYTES_RECEIVED_OFF": ("bytes_received", 8),
    "TCP_TOTAL_RETRANS_OFF": ("total_retrans", 4),
    "TCP_DSACK_DUPS_OFF": ("dsack_dups", 4),
    "TCP_SRTT_US_OFF": ("srtt_us", 4),
    "TCP_MIN_RTT_OFF": ("rtt_min.s.v", 4),  # struct minmax: s[0] holds the minimum
    "TCP_SEGS_IN_OFF": ("segs_in", 4),
    "TCP_SEGS_OUT_OFF": ("segs_out", 4),
}
NO_SWEEP = "set bpf.live_updates = false to count open connections' bytes at their close only"


def bpf_source_dir() -> Path:
    """bpf/ beside the package in a checkout; /usr/share/kmeshd/bpf when installed."""
    override = os.environ.get("KMESHD_BPF_DIR")
    candidates = [Path(override)] if override else []
    candidates += [Path(__file__).resolve().parent.parent / "bpf", Path("/usr/share/kmeshd/bpf")]
    for path in candidates:
        if (path / "tcp_probe.c").is_file():
            return path
    raise UnavailableError(
        "the BPF source tcp_probe.c is missing (looked in "
        + ", ".join(map(str, candidates))
        + "): reinstall kmeshd"
    )


def check_host(
    release: str | None = None, modules: Path = Path("/lib/modules"), sweep: bool = True
) -> None:
    """Fail fast, with the fix, on what bcc and the probe need: Linux 5.10 for the sock_ops
    program (the ring buffer came in 5.8, BTF-typed socket pointers in networking programs
    in 5.10), 5.15 for the socket sweep (TCP iterators that hold each socket's lock)."""
    release = release or os.uname().release
    major, minor = (int(x) for x in release.split(".")[:2])
    if (major, minor) < (5, 10):
        raise UnavailableError(
            f"kernel {release} is too old: kmeshd needs Linux 5.10 or newer"
            " (5.15 with bpf.live_updates, the default)"
        )
    if sweep and (major, minor) < (5, 15):
        raise UnavailableError(
            f"kernel {release} is too old for the socket sweep (Linux 5.15 or newer): {NO_SWEEP}"
        )
    build = modules / release / "build"
    if not (build / "include").is_dir():
        raise UnavailableError(
            f"no kernel headers at {build}: bcc compiles the probe against them; "
            "install linux-headers-amd64 and link /usr/src/linux-headers-<ver>-amd64 there "
            "(`make kernel-headers` does both)"
        )


def tcp_sock_offsets(kernel: btf.Btf, fields: dict[str, tuple[str, int]]) -> dict[str, int]:
    """The defines' offsets in the running kernel; BtfError names a field that is missing
    or not the size the probe reads."""
    offsets = {}
    for define, (path, size) in fields.items():
        field = kernel.field("tcp_sock", path)
        if field.size != size:
            raise btf.BtfError(f"tcp_sock.{path} is {field.size} bytes, the probe reads {size}")
        offsets[define] = field.offset
    return offsets


def sweep_offsets(kernel: btf.Btf) -> dict[str, int]:
    return tcp_sock_offsets(kernel, SWEEP_FIELDS)


def close_defines(kernel: btf.Btf) -> dict[str, int]:
    defines = tcp_sock_offsets(kernel, CLOSE_FIELDS)
    for define, (enum, member) in ENUM_VALUES.items():
        defines[define] = kernel.enum_value(enum, member)
    return defines


def kernel_defines(sweep: bool) -> dict[str, int]:
    """What the probe needs to know of the running kernel's types, as -D defines."""
    try:
        kernel = btf.load()
        defines = close_defines(kernel)
    except btf.BtfError as exc:
        raise UnavailableError(
            f"the probe cannot find what it reads in the kernel's BTF ({exc}): kmeshd needs a"
            " kernel built with CONFIG_DEBUG_INFO_BTF=y, which publishes /sys/kernel/btf/vmlinux"
        ) from exc
    if sweep:
        try:
            defines |= sweep_offsets(kernel)
        except btf.BtfError as exc:
            raise UnavailableError(
                f"the socket sweep cannot find its fields in the kernel's BTF ({exc}): {NO_SWEEP}"
            ) from exc
    return defines


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise UnavailableError(
            f"the bcc Python bindings cannot be imported ({exc}): "
            "apt-get install python3-bpfcc, and run kmeshd with /usr/bin/python3"
        ) from exc
    return bcc


class _LibBpf:
    """The handful of libbpf calls bcc lacks: bpf_link create/update/detach, pins."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        lib = ctypes.CDLL(name, use_errno=True)
        self.link_create = lib.bpf_link_create
        self.link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        self.link_update = lib.bpf_link_update
        self.link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        self.link_detach = lib.bpf_link_detach
        self.link_detach.argtypes = [ctypes.c_int]
        self.obj_pin = lib.bpf_obj_pin
        self.obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        self.obj_get = lib.bpf_obj_get
        self.obj_get.argtypes = [ctypes.c_char_p]
        self.info_by_fd = lib.bpf_obj_get_info_by_fd
        self.info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
        self.map_get_next_key = lib.bpf_map_get_next_key
        self.map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.map_delete_elem = lib.bpf_map_delete_elem
        self.map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self.map_lookup_elem = lib.bpf_map_lookup_elem
        self.map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.map_update_elem = lib.bpf_map_update_elem
        self.map_update_elem.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64,
        ]  # fmt: skip

    @staticmethod
    def check(ret: int, what: str) -> int:
        if ret < 0:
            raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
        return ret

    def _info(self, fd: int) -> bytes:
        buf = (ctypes.c_uint8 * 128)()
        size = ctypes.c_uint32(128)
        self.check(self.info_by_fd(fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
        return bytes(buf)

    def link_cgroup_id(self, link_fd: int) -> int:
        """struct bpf_link_info: cgroup.cgroup_id sits at offset 16."""
        return int.from_bytes(self._info(link_fd)[16:24], "little")

    def map_sizes(self, map_fd: int) -> tuple[int, int]:
        """struct bpf_map_info: key_size and value_size sit at offsets 8 and 12."""
        info = self._info(map_fd)
        return int.from_bytes(info[8:12], "little"), int.from_bytes(info[12:16], "little")


class RawMap:
    """A BPF map by file descriptor, keys and values as bytes: what the sweep does to the
    maps, whether a compiled probe holds them or `kmeshd sweep-sockets` opened the pins."""

    def __init__(self, libbpf: _LibBpf, fd: int) -> None:
        self._libbpf, self._fd = libbpf, fd
        self._key_size, self._value_size = libbpf.map_sizes(fd)

    def __iter__(self) -> Iterator[bytes]:
        key, after = ctypes.create_string_buffer(self._key_size), None
        while self._libbpf.map_get_next_key(self._fd, after, key) == 0:
            yield key.raw
            after = ctypes.create_string_buffer(key.raw, self._key_size)

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self._value_size)
        if self._libbpf.map_lookup_elem(self._fd, key, value):
            return None
        return value.raw

    def pop(self, key: bytes) -> bytes | None:
        """The value, removed; None when it was not there or someone else removed it
        first (the program of a killed kmeshd may still be attached)."""
        value = self.lookup(key)
        if value is None or self._libbpf.map_delete_elem(self._fd, key):
            return None
        return value

    def add(self, key: bytes, n: int) -> None:
        """value += n, for a map of __u64 counters only user space writes."""
        old = self.lookup(key)
        new = (int.from_bytes(old, sys.byteorder) if old else 0) + n
        ret = self._libbpf.map_update_elem(self._fd, key, new.to_bytes(8, sys.byteorder), 0)
        self._libbpf.check(ret, "bpf_map_update_elem")


class Probe:
    """A compiled, attached probe. Build it with `Probe.start(...)`."""

    def __init__(
        self, bpf: Any, libbpf: _LibBpf, link_fd: int, link_pin: Path, sweep_link: int | None
    ) -> None:
        self._bpf = bpf
        self._sweep_link = sweep_link
        self._sweeping = False
        self._libbpf = libbpf
        self._link_fd = link_fd
        self._link_pin = link_pin
        self._flows = bpf["flows"]
        self._known = bpf["known_addrs"]
        self._known_have: set[bytes] | None = None  # what set_known put in the map
        self._stats = bpf["stats"]
        self._settings = bpf["settings"]

    @classmethod
    def start(
        cls,
        pin_dir: Path,
        cgroup_dir: Path,
        phase: Callable[[str], None] = lambda _: None,
        sweep: bool = True,
    ) -> Probe:
        """Compile, load and attach; `phase` hears what it is doing (for STATUS=). Without
        `sweep`, open connections' bytes count at their close only."""
        check_host(sweep=sweep)
        bcc = import_bcc()
        pins = prepare_pin_dir(pin_dir)
        defines = kernel_defines(sweep)
        phase("compiling the BPF probe")
        bpf = compile_probe(bcc, pins, defines)
        sweep_link = attach_sweep(bcc, bpf) if sweep else None
        libbpf = _LibBpf()
        if may_enter_namespaces():
            sweep_closed_sockets(
                RawMap(libbpf, bpf["socks"].map_fd),
                RawMap(libbpf, bpf["unseen_closes"].map_fd),
                sockdiag.live_cookies,
            )
        else:
            log.info(
                "sockets that closed while kmeshd was stopped are left to `kmeshd"
                " sweep-sockets` (the unit runs it privileged): this process may not enter"
                " other network namespaces (CAP_SYS_ADMIN, CAP_SYS_PTRACE)"
            )
        phase(f"attaching the probe to {cgroup_dir}")
        prog = bpf.load_func(PROGRAM, bcc.BPF.SOCK_OPS)
        try:
            link_fd = attach(libbpf, prog.fd, cgroup_dir, pins / "link")
        except OSError as exc:
            bpf.cleanup()
            raise UnavailableError(f"cannot attach the probe to {cgroup_dir}: {exc}") from exc
        return cls(bpf, libbpf, link_fd, pins / "link", sweep_link)

    def on_record(self, callback: Callable[[bytes], bool]) -> None:
        """Call `callback(raw record)` for each ring-buffer record drain() consumes; when it
        returns False, drain() stops and the rest stay queued in the kernel."""

        def _cb(_ctx: Any, data: Any, size: int) -> int:
            return 0 if callback(ctypes.string_at(data, size)) else -1

        self._bpf["records"].open_ring_buffer(_cb)

    def drain(self) -> None:
        """Hand every queued record to the callback (until it says stop); never waits."""
        self._bpf.ring_buffer_consume()

    def flows(self) -> Iterator[tuple[bytes, bytes]]:
        """The flows map as raw (key, value) pairs."""
        for k, v in self._flows.items():
            yield bytes(k), bytes(v)

    def unseen_closes(self) -> dict[bytes, int]:
        """Closes the sweep counted, by raw flow key (see sweep_closed_sockets)."""
        return {bytes(k): int(v.value) for k, v in self._bpf["unseen_closes"].items()}

    def stats(self) -> dict[Stat, int]:
        """The per-CPU counters, summed."""
        return {s: sum(self._stats[ctypes.c_int(s)]) for s in Stat}

    def want_records(self, on: bool) -> None:
        """Whether the kernel queues access-log records at all (off: no ring work)."""
        self._set(SETTING_RECORDS, int(on))

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
        if not self._sweeping or self._sweep_link is None:
            return 0
        swept, _hidden = sockdiag.in_each_namespace(self._sweep_here, on_error)
        return len(swept)

    def _sweep_here(self) -> None:
        """One pass of the iterator over the calling thread's network namespace: the
        iterator takes the namespace it is created in. It writes nothing, so the first
        read returns at the end."""
        from bcc.libbcc import lib

        fd = _LibBpf.check(lib.bcc_iter_create(self._sweep_link), "bpf_iter_create")
        try:
            while os.read(fd, 4096):
                pass
        finally:
            os.close(fd)

    def want_periodic_records(self, seconds: float) -> None:
        """A record of each open connection's totals every `seconds` it moves bytes; 0: none."""
        self._set(SETTING_PERIODIC, round(seconds * 1e9))

    def _set(self, index: int, value: int) -> None:
        self._settings[ctypes.c_int(index)] = ctypes.c_uint64(value)

    def set_known(self, addresses: Iterable[IPAddress]) -> int:
        """Make the kernel's known-address set equal `addresses`; returns entries refused."""
        want = {encode_address(a) for a in addresses}
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


def prepare_pin_dir(pin_dir: Path) -> Path:
    if not is_bpffs(pin_dir):
        raise UnavailableError(
            f"{pin_dir} is not on a BPF filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) "
            "or set bpf.pin_dir"
        )
    pins = pin_dir / f"v{LAYOUT}"
    pins.mkdir(parents=True, exist_ok=True, mode=0o700)
    for other in pin_dir.iterdir():
        if other != pins and re.fullmatch(r"v\d+", other.name):
            # An older kmeshd's maps and link: its program must not keep counting beside
            # ours. Unpinning the link detaches it; its counters start again from zero.
            log.warning("removing the probe and maps of another kmeshd layout in %s", other)
            remove_pins(other)
    return pins


def sweep_closed_sockets(
    socks: SweptMap, unseen: SweptMap, live_cookies: Callable[[], set[int]]
) -> int | None:
    """Delete the state of sockets that closed while no probe was attached, and count the
    closes of the established ones in `unseen` (by flow), so that opened - closed stays
    the number of open connections. Returns how many were swept, or None when the live
    sockets could not be listed (then nothing is). Safe beside a running program (after a
    SIGKILL the old one still is): the keys are read before the live cookies, a cookie is
    never reused, and a close is counted only by whoever deletes the entry."""
    stale = {int.from_bytes(k, sys.byteorder): k for k in socks}
    if not stale:
        return 0
    try:
        alive = live_cookies()
    except OSError as exc:
        log.warning(
            "cannot list live sockets (%s): %d socket-state entries stay until a start "
            'that can; if the map fills, kmeshd_bpf_map_full_total{map="sockets"} rises',
            exc,
            len(stale),
        )
        return None
    swept = 0
    for cookie in stale.keys() - alive:
        value = socks.pop(stale[cookie])
        if value is None:  # the old program closed it meanwhile, and counted it
            continue
        swept += 1
        state = SockStateStruct.from_buffer_copy(value)
        if state.flags & SF_ESTABLISHED:
            unseen.add(bytes(state.key), 1)
    if swept:
        log.info("forgot %d sockets that closed while kmeshd was stopped", swept)
    return swept


class SweptMap(Protocol):
    """What the sweep needs of a map (RawMap; a dict-backed fake in tests)."""

    def __iter__(self) -> Iterator[bytes]: ...
    def pop(self, key: bytes) -> bytes | None: ...
    def add(self, key: bytes, n: int) -> None: ...


CAP_SYS_PTRACE, CAP_SYS_ADMIN = 19, 21


def may_enter_namespaces(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process has the capabilities the sweep needs (see sockdiag)."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return all(effective >> cap & 1 for cap in (CAP_SYS_PTRACE, CAP_SYS_ADMIN))
    return False


NOT_PINNED = -1


def sweep_pinned(pin_dir: Path) -> int | None:
    """`kmeshd sweep-sockets`: sweep the pinned maps of a running (or stopped) kmeshd, as
    sweep_closed_sockets does; NOT_PINNED when there are no such maps."""
    pins = pin_dir / f"v{LAYOUT}"
    if not (pins / "socks").exists():
        return NOT_PINNED
    libbpf = _LibBpf()
    with contextlib.ExitStack() as fds:
        maps = []
        for name in ("socks", "unseen_closes"):
            path = pins / name
            fd = libbpf.check(libbpf.obj_get(str(path).encode()), f"bpf_obj_get {path}")
            fds.callback(os.close, fd)
            maps.append(RawMap(libbpf, fd))
        return sweep_closed_sockets(maps[0], maps[1], sockdiag.live_cookies)


def is_bpffs(path: Path) -> bool:
    """True when `path` (or the nearest existing parent) is on a bpf filesystem."""
    while not path.exists():
        path = path.parent
    return cgroup.fs_magic(path) == BPF_FS_MAGIC


def compile_probe(bcc: Any, pins: Path, kernel: dict[str, int]) -> Any:
    """`kernel`: kernel_defines(); without the sweep's, the probe has no socket sweep."""
    src = bpf_source_dir()
    cflags = [f"-D{define}={value}" for define, value in kernel.items()]
    cflags += [
        f"-I{src}",
        f'-DPIN_DIR="{pins}"',
        f"-DFLOWS_MAX={FLOWS_MAX}",
        f"-DKNOWN_MAX={KNOWN_MAX}",
        f"-DSOCKS_MAX={SOCKS_MAX}",
        f"-DRINGBUF_PAGES={RINGBUF_PAGES}",
    ]
    try:
        bpf = bcc.BPF(src_file=str(src / "tcp_probe.c").encode(), cflags=cflags)
    except Exception as exc:
        raise UnavailableError(f"bcc could not compile or load the probe: {exc}") from exc
    release_freed_memory()
    release_compiler_pages()
    return bpf


def attach_sweep(bcc: Any, bpf: Any) -> int:
    """Load the socket sweep and link it as a TCP iterator: the link's fd."""
    from bcc.libbcc import lib

    try:
        program = bpf.load_func(SWEEP_PROGRAM, bcc.BPF.TRACING)
        return _LibBpf.check(lib.bcc_iter_attach(program.fd, None, 0), "bpf_link_create")
    except Exception as exc:
        bpf.cleanup()
        raise UnavailableError(
            f"the kernel refused the socket sweep, a TCP iterator program (Linux 5.15 or"
            f" newer): {exc}: {NO_SWEEP}"
        ) from exc


def release_freed_memory() -> None:
    """Hand the heap that clang/LLVM freed after compiling back to the system: glibc keeps
    it otherwise, about 36 MiB of the daemon's resident memory for its whole life."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")
COMPILER_LIBS = re.compile(r"/lib(LLVM|clang)[^/]*\.so")
MADV_DONTNEED = 4


def clean_mappings(smaps: str, path: re.Pattern[str]) -> list[tuple[int, int]]:
    """(start, end) of the mappings of files matching `path` that hold no page of their
    own (no Anonymous, no Private_Dirty): every resident page is the file's, unchanged."""
    found: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    own = 0
    for line in [*smaps.splitlines(), "0-0 p 0 0 0"]:  # a last header closes the last one
        header = _MAPPING.match(line)
        if header:
            if current is not None and own == 0:
                found.append(current)
            matches = path.search(header.group(3))
            current = (int(header.group(1), 16), int(header.group(2), 16)) if matches else None
            own = 0
        elif line.startswith(("Anonymous:", "Private_Dirty:")):
            own += int(line.split()[1])
    return found


def release_compiler_pages(smaps: Path = Path("/proc/self/smaps")) -> int:
    """Drop the resident pages of clang and LLVM, which only the compile used: about 75 MiB
    of the daemon's RSS. Only unmodified file pages are dropped, so a later use of the
    libraries reads them back from the file; nothing changes but residency. Returns the
    bytes released."""
    try:
        ranges = clean_mappings(smaps.read_text(), COMPILER_LIBS)
        madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    released = 0
    for start, end in ranges:
        if madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            released += end - start
    return released


def attach(libbpf: _LibBpf, prog_fd: int, cgroup_dir: Path, pin: Path) -> int:
    """Replace the program behind our pinned link, or create and pin a new link."""
    cgroup_id = os.stat(cgroup_dir).st_ino
    if pin.exists():
        link_fd = libbpf.check(libbpf.obj_get(str(pin).encode()), f"open {pin}")
        if libbpf.link_cgroup_id(link_fd) == cgroup_id:
            libbpf.check(libbpf.link_update(link_fd, prog_fd, None), "bpf_link_update")
            log.info("replaced the probe left attached by a previous kmeshd")
            return link_fd
        # bpf.cgroup changed since that link was made: move, don't duplicate.
        libbpf.link_detach(link_fd)
        os.close(link_fd)
        pin.unlink()
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link_fd = libbpf.check(
            libbpf.link_create(prog_fd, fd, BPF_CGROUP_SOCK_OPS, None), "bpf_link_create"
        )
    finally:
        os.close(fd)
    libbpf.check(libbpf.obj_pin(link_fd, str(pin).encode()), f"pin {pin}")
    return link_fd


def remove_pins(pin_dir: Path) -> None:
    """Forget all kernel state (tests, and `kmeshd` uninstall): detaches a pinned link too."""
    shutil.rmtree(pin_dir, ignore_errors=True)
