"""Files kmeshd writes: replaced whole with their mode, old content kept on failure;
directories checked, default ones created readable by others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kmeshd.files import (
    NotRegularError,
    check_directory,
    prepare_directory,
    read_regular,
    writable_problem,
    write_atomic,
)


def test_write_atomic_replaces_with_mode_0644(tmp_path: Path) -> None:
    """The textfile is replaced whole, world-readable, and no temp file is left behind."""
    path = tmp_path / "kmeshd.prom"
    path.write_text("old\n")
    old_umask = os.umask(0o077)
    try:
        write_atomic(path, b"new\n", 0o644)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["kmeshd.prom"]


def test_write_atomic_failure_keeps_old_file(tmp_path: Path) -> None:
    """A failed write raises and leaves the previous textfile untouched."""
    path = tmp_path / "kmeshd.prom"
    path.write_text("old\n")
    (tmp_path / f".kmeshd.prom.{os.getpid()}.tmp").mkdir()  # the temp name cannot be opened
    with pytest.raises(OSError):
        write_atomic(path, b"new\n", 0o644)
    assert path.read_text() == "old\n"


def test_check_directory_reports_missing(tmp_path: Path) -> None:
    """A missing textfile directory is named."""
    assert (
        check_directory(tmp_path / "nope" / "k.prom")
        == f"directory {tmp_path / 'nope'} does not exist"
    )
    assert check_directory(tmp_path / "k.prom") is None


def test_a_default_directory_is_created_readable_by_others(tmp_path: Path) -> None:
    """A missing default directory is made 0755 even under the unit's UMask=0027:
    node-exporter, another user, reads the textfile there."""
    textfile = tmp_path / "prometheus" / "node-exporter" / "kmeshd.prom"
    old = os.umask(0o027)
    try:
        prepare_directory(textfile, False, Path("/etc/kmeshd/kmeshd.toml"), "metrics.textfile")
    finally:
        os.umask(old)
    for directory in (textfile.parent, textfile.parent.parent):
        assert (directory.stat().st_mode & 0o777) == 0o755


def special(tmp_path: Path, kind: str) -> Path:
    """A file of `kind` in tmp_path (or a device of the host)."""
    if kind.startswith("/"):
        return Path(kind)
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        path.write_bytes(b"x" * int(kind.removeprefix("bytes-")))
    return path


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("fifo", "is a FIFO, not a regular file (name a regular file)"),
        ("dir", "is a directory, not a regular file (name a regular file)"),
        ("/dev/zero", "is a character device, not a regular file (name a regular file)"),
        ("/dev/urandom", "is a character device, not a regular file (name a regular file)"),
        ("bytes-101", "is larger than 100 bytes, the most kmeshd reads of it"),
    ],
)
def test_read_regular_refuses_what_would_block_or_never_end(
    tmp_path: Path, kind: str, problem: str
) -> None:
    with pytest.raises(NotRegularError) as e:
        read_regular(special(tmp_path, kind), 100)
    assert str(e.value) == problem


def test_read_regular_reads_up_to_the_limit(tmp_path: Path) -> None:
    assert read_regular(special(tmp_path, "bytes-100"), 100) == b"x" * 100


@pytest.mark.parametrize(
    ("setup", "explicit", "problem"),
    [
        ("missing/deeper/f", False, None),  # run creates the directories
        ("missing/f", True, "directory {t}/missing does not exist (create it or change k.x)"),
        ("file/f", False, "{t}/file is not a directory (create it or change k.x)"),
        ("dir", True, "{t}/dir is a directory, not a regular file (change k.x)"),
        ("fifo", True, "{t}/fifo is a FIFO, not a regular file (change k.x)"),
        ("bytes-1", True, None),
        ("new", True, None),
    ],
)
def test_writable_problem_writes_nothing(
    tmp_path: Path, setup: str, explicit: bool, problem: str | None
) -> None:
    """What `run` would find writing the file, found by check-config without a write."""
    first = setup.split("/")[0]
    if first in ("dir", "fifo", "bytes-1"):
        special(tmp_path, first)
    if first == "file":
        (tmp_path / "file").write_text("")
    before = sorted(os.listdir(tmp_path))
    expected = problem.format(t=tmp_path) if problem else None
    assert writable_problem(tmp_path / setup, explicit, "k.x") == expected
    assert sorted(os.listdir(tmp_path)) == before


def test_the_access_logs_default_directory_is_created_0750(tmp_path: Path) -> None:
    """Group adm's and root's only: records name addresses and workloads."""
    log = tmp_path / "log" / "kmeshd" / "accesslog.json"
    old = os.umask(0o077)
    try:
        prepare_directory(log, False, Path("/etc/kmeshd/kmeshd.toml"), "accesslog.file", 0o750)
    finally:
        os.umask(old)
    assert [d.stat().st_mode & 0o777 for d in (log.parent, log.parent.parent)] == [0o750, 0o755]
