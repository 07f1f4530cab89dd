"""Host checks before bcc runs: kernel version and headers, with messages naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmeshd.errors import UnavailableError
from kmeshd.kernel.build import bpf_source_dir, check_host


@pytest.mark.parametrize("release", ["5.4.0", "5.10.0-28-amd64", "5.11.22"])
def test_kernel_too_old_is_unavailable(tmp_path: Path, release: str) -> None:
    """Older than 5.12 (BPF compare-and-swap): refused by name, with what it lacks."""
    with pytest.raises(UnavailableError) as exc:
        check_host(release, tmp_path)
    assert str(exc.value) == (
        f"kernel {release} is too old: kmeshd needs Linux 5.12 or newer (BPF atomic"
        " compare-and-swap)"
    )


def test_kernel_5_12_passes(tmp_path: Path) -> None:
    (tmp_path / "5.12.0" / "build" / "include").mkdir(parents=True)
    check_host("5.12.0", tmp_path)


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
