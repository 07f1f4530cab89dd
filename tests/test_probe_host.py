"""Host checks before bcc runs (kernel version and headers, with messages naming the fix),
and what is given back after it ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmeshd.errors import UnavailableError
from kmeshd.probe import (
    COMPILER_LIBS,
    bpf_source_dir,
    check_host,
    clean_mappings,
    may_enter_namespaces,
)


@pytest.mark.parametrize(
    ("release", "sweep", "message"),
    [
        ("5.4.0", True, r"kernel 5\.4\.0 is too old: kmeshd needs Linux 5\.10 or newer \(5\.15"),
        ("5.9.16", False, r"kernel 5\.9\.16 is too old: kmeshd needs Linux 5\.10 or newer"),
        ("5.10.0-28-amd64", True, r"5\.10\.0-28-amd64 is too old for the socket sweep"
         r" \(Linux 5\.15 or newer\): set bpf\.live_updates = false"),
    ],
)  # fmt: skip
def test_kernel_too_old_is_unavailable(
    tmp_path: Path, release: str, sweep: bool, message: str
) -> None:
    """Older than 5.10, or than 5.15 with the socket sweep: refused by name, with the fix."""
    with pytest.raises(UnavailableError, match=message):
        check_host(release, tmp_path, sweep=sweep)


def test_kernel_5_10_without_the_sweep_passes(tmp_path: Path) -> None:
    """5.10 is enough for the probe alone (bpf.live_updates = false)."""
    (tmp_path / "5.10.0-28-amd64" / "build" / "include").mkdir(parents=True)
    check_host("5.10.0-28-amd64", tmp_path, sweep=False)


def test_missing_kernel_headers_name_the_package(tmp_path: Path) -> None:
    """No /lib/modules/<release>/build: the message names the package and make kernel-headers."""
    with pytest.raises(UnavailableError, match="linux-headers-amd64.*make kernel-headers"):
        check_host("6.18.44-test", tmp_path)


def test_headers_present_pass(tmp_path: Path) -> None:
    """With an include directory under build, the check passes."""
    (tmp_path / "6.18.44-test" / "build" / "include").mkdir(parents=True)
    check_host("6.18.44-test", tmp_path)


def test_bpf_source_found_in_checkout() -> None:
    """A checkout finds bpf/tcp_probe.c beside the package."""
    assert (bpf_source_dir() / "tcp_probe.c").is_file()


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


@pytest.mark.parametrize(
    ("cap_eff", "expected"),
    [
        ("000001ffffffffff", True),  # root, every capability
        (f"{1 << 21 | 1 << 19:016x}", True),  # CAP_SYS_ADMIN and CAP_SYS_PTRACE only
        (f"{1 << 39 | 1 << 38 | 1 << 21 | 1 << 12:016x}", False),  # the unit's: no SYS_PTRACE
        (f"{1 << 19:016x}", False),  # CAP_SYS_PTRACE alone: may look, not enter
    ],
)
def test_may_enter_namespaces(tmp_path: Path, cap_eff: str, expected: bool) -> None:
    status = tmp_path / "status"
    status.write_text(f"Name:\tkmeshd\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")
    assert may_enter_namespaces(status) is expected
