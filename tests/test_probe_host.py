"""Host checks before bcc runs: kernel version and headers, with messages naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmeshd.errors import UnavailableError
from kmeshd.probe import bpf_source_dir, check_host


def test_kernel_older_than_5_8_is_unavailable(tmp_path: Path) -> None:
    """The ring buffer needs 5.8: an older kernel is refused by name."""
    with pytest.raises(UnavailableError, match=r"kernel 5\.4\.0 is too old.*5\.8"):
        check_host("5.4.0", tmp_path)


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
