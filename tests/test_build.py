"""Host checks before bcc runs: kernel version and headers, with messages naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmeshd.errors import UnavailableError
from kmeshd.kernel.build import bpf_source_dir, check_host


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
