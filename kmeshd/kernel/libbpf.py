"""The handful of libbpf calls bcc lacks, through ctypes: bpf_link create/update/detach,
pins, object info, and raw map access by file descriptor.

bcc 0.26 has pinned tables but no link API, and `kmeshd sweep-sockets` opens the pinned
maps without compiling anything; libbpf.so.1 comes with bcc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from collections.abc import Callable, Iterator

BPF_NOEXIST = 1  # map update flag: only a key that is not there yet


@functools.cache
def _libbpf() -> ctypes.CDLL:
    """libbpf.so.1 (it comes with bcc), loaded once."""
    return ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)


class LibBpf:
    """libbpf's low-level syscall wrappers, typed for ctypes."""

    def __init__(self) -> None:
        lib = _libbpf()
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
        self.prog_get_fd_by_id = lib.bpf_prog_get_fd_by_id
        self.prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
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
        self.map_lookup_batch = lib.bpf_map_lookup_batch
        self.map_lookup_batch.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p,
        ]  # fmt: skip
        self.map_delete_batch = lib.bpf_map_delete_batch
        self.map_delete_batch.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p,
        ]  # fmt: skip

    @staticmethod
    def check(ret: int, what: str) -> int:
        """`ret`, or OSError when it is a negative errno."""
        if ret < 0:
            raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
        return ret

    def open_pinned(self, path: os.PathLike[str] | str) -> int:
        """A file descriptor of the object pinned at `path` (BPF_OBJ_GET)."""
        return self.check(self.obj_get(os.fsencode(path)), f"bpf_obj_get {path}")

    def _info(self, fd: int) -> bytes:
        buf = (ctypes.c_uint8 * 128)()
        size = ctypes.c_uint32(128)
        self.check(self.info_by_fd(fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
        return bytes(buf)

    def link_cgroup_id(self, link_fd: int) -> int:
        """struct bpf_link_info: cgroup.cgroup_id sits at offset 16."""
        return int.from_bytes(self._info(link_fd)[16:24], "little")

    def link_prog_id(self, link_fd: int) -> int:
        """struct bpf_link_info: prog_id sits at offset 8."""
        return int.from_bytes(self._info(link_fd)[8:12], "little")

    def map_sizes(self, map_fd: int) -> tuple[int, int]:
        """struct bpf_map_info: key_size and value_size sit at offsets 8 and 12."""
        info = self._info(map_fd)
        return int.from_bytes(info[8:12], "little"), int.from_bytes(info[12:16], "little")

    def map_id(self, map_fd: int) -> int:
        """struct bpf_map_info: id sits at offset 4 (unique while the map exists)."""
        return int.from_bytes(self._info(map_fd)[4:8], "little")

    def map_capacity(self, map_fd: int) -> int:
        """struct bpf_map_info: max_entries sits at offset 16."""
        return int.from_bytes(self._info(map_fd)[16:20], "little")


class RawMap:
    """A BPF map by file descriptor, keys and values as bytes: what the closed-socket sweep
    does to the maps, whether a compiled probe holds them or `kmeshd sweep-sockets` opened
    the pins."""

    def __init__(self, libbpf: LibBpf, fd: int) -> None:
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

    def update(self, key: bytes, value: bytes) -> None:
        self._libbpf.check(
            self._libbpf.map_update_elem(self._fd, key, value, 0), "bpf_map_update_elem"
        )

    def delete(self, key: bytes) -> bool:
        """False when the key was not there."""
        return bool(self._libbpf.map_delete_elem(self._fd, key) == 0)

    def per_cpu_sum(self, key: bytes, cpus: int) -> int:
        """The sum over CPUs of a per-CPU map's u64 value."""
        values = (ctypes.c_uint64 * cpus)()
        if self._libbpf.map_lookup_elem(self._fd, key, values):
            return 0
        return sum(values)

    def insert(self, key: bytes, value: bytes) -> bool:
        """Add an entry that is not there yet (BPF_NOEXIST); False when the key exists."""
        ret = self._libbpf.map_update_elem(self._fd, key, value, BPF_NOEXIST)
        if ret == -errno.EEXIST:
            return False
        self._libbpf.check(ret, "bpf_map_update_elem")
        return True


class BatchReader:
    """A hash map read in batches (BPF_MAP_LOOKUP_BATCH), `chunk` entries a syscall into
    buffers allocated once: each batch's keys and values come back as two bytes objects,
    laid end to end, for struct.iter_unpack and slicing. A batch at a time, so a full map
    of 65,536 flows (45 MiB of values) never has to be resident whole."""

    CHUNK = 4096

    def __init__(self, libbpf: LibBpf, fd: int, chunk: int = CHUNK) -> None:
        self._libbpf, self._fd = libbpf, fd
        self.key_size, self.value_size = libbpf.map_sizes(fd)
        self.capacity = libbpf.map_capacity(fd)
        self._chunk = min(chunk, self.capacity)
        self._keys = ctypes.create_string_buffer(self.key_size * self._chunk)
        self._values = ctypes.create_string_buffer(self.value_size * self._chunk)

    def batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        """(keys, values, count) of every entry, a batch at a time; entries that come or go
        meanwhile may or may not be among them."""
        token, first = ctypes.c_uint32(0), True
        keys, values = ctypes.addressof(self._keys), ctypes.addressof(self._values)
        while True:
            count = ctypes.c_uint32(self._chunk)
            ret = self._libbpf.map_lookup_batch(
                self._fd,
                None if first else ctypes.byref(token),
                ctypes.byref(token),
                keys,
                values,
                ctypes.byref(count),
                None,
            )
            if ret not in (0, -errno.ENOENT):
                self._libbpf.check(ret, "bpf_map_lookup_batch")
            n = count.value
            if n:
                yield (
                    ctypes.string_at(keys, n * self.key_size),
                    ctypes.string_at(values, n * self.value_size),
                    n,
                )
            if ret == -errno.ENOENT:  # the end of the map
                return
            first = False

    def read(self) -> tuple[bytes, bytes, int]:
        """Every entry in one piece (for maps that stay small)."""
        batches = list(self.batches())
        return (
            b"".join(k for k, _v, _n in batches),
            b"".join(v for _k, v, _n in batches),
            sum(n for _k, _v, n in batches),
        )

    def delete(self, keys: bytes) -> int:
        """Delete the entries whose keys `keys` holds end to end; returns how many were (a
        key already gone is passed over)."""
        deleted, at = 0, 0
        while at < len(keys):
            count = ctypes.c_uint32((len(keys) - at) // self.key_size)
            rest = ctypes.c_char_p(keys[at:])
            ret = self._libbpf.map_delete_batch(self._fd, rest, ctypes.byref(count), None)
            deleted += count.value
            at += count.value * self.key_size
            if ret == -errno.ENOENT:  # the kernel stops at a key that is gone: skip it
                at += self.key_size
            elif self._libbpf.check(ret, "bpf_map_delete_batch") == 0 and not count.value:
                break
        return deleted


_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class RingBuffer:
    """A BPF ring buffer by file descriptor, consumed through libbpf's ring_buffer API
    (it maps the ring; reading it needs the map's fd, no capability)."""

    def __init__(self, fd: int, callback: Callable[[bytes], bool]) -> None:
        lib = _libbpf()
        self._new, self._consume, self._free = (
            lib.ring_buffer__new,
            lib.ring_buffer__consume,
            lib.ring_buffer__free,
        )
        self._new.restype = ctypes.c_void_p
        self._new.argtypes = [ctypes.c_int, _SAMPLE_FN, ctypes.c_void_p, ctypes.c_void_p]
        self._consume.argtypes = [ctypes.c_void_p]
        self._free.argtypes = [ctypes.c_void_p]

        def sample(_ctx: int, data: int, size: int) -> int:
            return 0 if callback(ctypes.string_at(data, size)) else -1

        self._sample = _SAMPLE_FN(sample)  # kept: libbpf holds the pointer
        ring = self._new(fd, self._sample, None, None)
        if not ring:
            err = ctypes.get_errno()
            raise OSError(err, f"ring_buffer__new: {os.strerror(err)}")
        self._ring: int | None = ring

    def consume(self) -> None:
        """Hand every queued record to the callback, until it says stop; never waits."""
        if self._ring is not None:
            self._consume(self._ring)

    def close(self) -> None:
        if self._ring is not None:
            self._free(self._ring)
            self._ring = None


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many values a per-CPU map holds per key: "0-3" -> 4, "0,2-3" -> 4 (ids up to
    the highest possible one)."""
    with open(path) as f:
        text = f.read().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
