"""Giving back memory that only compiling the probe needed.

bcc compiles with clang and LLVM inside the daemon's process: afterwards glibc keeps the
heap they freed, and their libraries' pages stay resident. Neither is used again.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from pathlib import Path

_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")
COMPILER_LIBS = re.compile(r"/lib(LLVM|clang)[^/]*\.so")
MADV_DONTNEED = 4


def release_freed_memory() -> None:
    """Hand the heap freed since (clang's, or a large JSON list's) back to the system: glibc
    keeps it otherwise, about 36 MiB of the daemon's resident memory for its whole life."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
