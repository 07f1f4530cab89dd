"""What is given back after bcc compiled the probe: only clang's and LLVM's clean pages."""

from __future__ import annotations

from kmeshd.kernel.memory import COMPILER_LIBS, clean_mappings

SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 08:01 1234   /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                1024 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000100000-7f0000400000 r-xp 00100000 08:01 1234   /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                3072 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000400000-7f0000410000 r--p 00400000 08:01 1234   /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                  64 kB
Private_Dirty:        64 kB
Anonymous:            64 kB
7f0000500000-7f0000600000 r-xp 00000000 08:01 99     /usr/lib/llvm-14/lib/libclang-cpp.so.14
Rss:                 512 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000600000-7f0000700000 r-xp 00000000 08:01 77     /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
Rss:                 512 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000700000-7f0000800000 rw-p 00000000 00:00 0
Rss:                   4 kB
Anonymous:             4 kB
"""


def test_only_unmodified_pages_of_clang_and_llvm_are_released() -> None:
    """Text and read-only data of libLLVM and libclang, not their relocated (dirty)
    pages, not other libraries, not anonymous memory."""
    assert clean_mappings(SMAPS, COMPILER_LIBS) == [
        (0x7F0000000000, 0x7F0000100000),
        (0x7F0000100000, 0x7F0000400000),
        (0x7F0000500000, 0x7F0000600000),
    ]
