"""Which filesystem a path is on: the probe pins on a BPF filesystem and attaches to a
directory of a cgroup v2 one."""

from __future__ import annotations

import ctypes
from pathlib import Path

BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270


def fs_magic(path: Path) -> int:
    """statfs(2) f_type, which os.statvfs does not expose (0 when statfs fails)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = (ctypes.c_long * 16)()  # struct statfs: f_type is the first word
    if libc.statfs(str(path).encode(), buf) != 0:
        return 0
    return int(buf[0]) & 0xFFFFFFFF
