"""The files kmeshd reads and writes: read as regular files of a bounded size, written
atomically, in directories checked before use.

read_regular()        every file the config names: config, inventory, kubeconfig, token, CA
write_atomic()        the textfile, the kubeconfig's embedded certificates
writable_problem()    whether `run` could write a file there, checked without writing
prepare_directory()   the textfile's and the access log's directories, at start-up
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from kmeshd.errors import ConfigError

MiB = 1 << 20
# What each file a config names may weigh: far above any real one (an inventory of 100,000
# workloads is about 20 MiB), far below what would hurt the host to hold in memory.
CONFIG_LIMIT = 1 * MiB
INVENTORY_LIMIT = 64 * MiB
CREDENTIAL_LIMIT = 1 * MiB  # a kubeconfig, a token, a certificate or a key

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularError(ValueError):
    """A file kmeshd reads that is no regular file, or too large: the message says which."""


def kind(mode: int) -> str:
    """What a file that is not regular is, for messages: "a FIFO", "a directory"."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _not_regular(mode: int) -> str:
    return f"is {kind(mode)}, not a regular file (name a regular file)"


def _size(limit: int) -> str:
    return f"{limit // MiB} MiB" if limit >= MiB else f"{limit} bytes"


def read_regular(path: Path, limit: int) -> bytes:
    """The content of the regular file `path`, at most `limit` bytes; OSError (reading, as
    the system said it), or NotRegularError for a FIFO, a device, a directory, a larger
    file. Never blocks: a FIFO is refused by stat before it is opened, and O_NONBLOCK
    covers one swapped in between; never reads more than `limit` + 1 bytes (/dev/zero)."""
    if "\0" in str(path):
        raise NotRegularError("contains a NUL byte, which no path can (remove it)")
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularError(_not_regular(mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularError(_not_regular(mode))
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, MiB))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    if left <= 0:
        raise NotRegularError(f"is larger than {_size(limit)}, the most kmeshd reads of it")
    return b"".join(chunks)


class AtomicFile:
    """A file written aside and renamed over `path` by commit(), with permissions `mode`
    whatever the umask, so a reader (node-exporter, a connection opening a certificate)
    sees the old file or the new one, never half of one. Opening and writing raise
    OSError; abort() (or an error inside a `with`) leaves the old file as it was."""

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self._tmp.unlink(missing_ok=True)  # a leftover of a crash: never write through a link
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd: int | None = os.open(self._tmp, flags, mode)
            os.fchmod(self._fd, mode)
        except OSError:
            self.abort()
            raise

    def write(self, data: bytes) -> None:
        assert self._fd is not None, "committed or aborted"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def commit(self) -> None:
        fd, self._fd = self._fd, None
        assert fd is not None, "committed or aborted"
        try:
            os.close(fd)
            os.replace(self._tmp, self.path)
        except OSError:
            self.abort()
            raise

    def abort(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: object, *_rest: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (see AtomicFile); raises OSError, leaving the old file
    intact."""
    with AtomicFile(path, mode) as f:
        f.write(data)


def _directory_problem(directory: Path) -> str | None:
    """Why no file can be made in `directory`, found without writing: or None."""
    if not directory.is_dir():
        exists = os.path.lexists(directory)
        return (
            f"{directory} is not a directory" if exists else f"directory {directory} does not exist"
        )
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        return f"directory {directory} is not writable (Read-only file system)"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable (Permission denied)"
    return None


def check_directory(path: Path) -> str | None:
    """Why a file cannot be written at `path` (its directory), or None: by writing a probe."""
    directory = path.parent
    if (problem := _directory_problem(directory)) is not None:
        return problem
    probe = directory / f".{path.name}.{os.getpid()}.probe"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:  # a read-only mount passes os.access as root
        return f"directory {directory} is not writable ({exc.strerror})"
    return None


def writable_problem(path: Path, explicit: bool, key: str) -> str | None:
    """Why `run` could not write the file `path` that `key` names, found without writing
    anything (check-config's check, which `run` makes too): an existing file must be a
    regular one; its directory must exist when `explicit` (set in the config), else the
    nearest existing one must be a writable directory, where `run` creates the rest."""
    fix = f"(create it or change {key})"
    try:
        mode: int | None = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as exc:
        return f"cannot use {path}: {exc.strerror} (change {key})"
    if mode is not None and not stat.S_ISREG(mode):
        return f"{path} is {kind(mode)}, not a regular file (change {key})"
    directory = path.parent
    while not explicit and not os.path.lexists(directory) and directory != directory.parent:
        directory = directory.parent
    if (problem := _directory_problem(directory)) is not None:
        return f"{problem} {fix}"
    if mode is not None and not os.access(path, os.W_OK):
        return f"{path} is not writable (Permission denied) (change {key})"
    return None


def prepare_directory(
    path: Path, explicit: bool, config_path: Path, key: str, mode: int = 0o755
) -> None:
    """Create the directory of `path` when it is missing and the config left `key` at its
    default, with `mode` (its parents 0755); an explicit one must exist and be writable
    (ConfigError naming `key`)."""
    if not path.parent.exists() and not explicit:
        missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
        for directory in reversed(missing):
            directory.mkdir(exist_ok=True)
            # Whatever the umask (the unit sets 0077): 0755 lets node-exporter, another
            # user, reach the textfile; the access log's 0750 keeps others out.
            directory.chmod(mode if directory == path.parent else 0o755)
    problem = check_directory(path)
    if problem:
        raise ConfigError([f"{config_path}: {key}: {problem} (create it or change {key})"])
