"""The files kmeshd writes: replaced atomically, in directories checked before use.

write_atomic()        the textfile, the kubeconfig's embedded certificates
prepare_directory()   the textfile's and the access log's directories, at start-up
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kmeshd.errors import ConfigError


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


def check_directory(path: Path) -> str | None:
    """Why a file cannot be written at `path` (its directory), or None."""
    directory = path.parent
    if not directory.is_dir():
        return f"directory {directory} does not exist"
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        return f"directory {directory} is not writable (Read-only file system)"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable (Permission denied)"
    probe = directory / f".{path.name}.{os.getpid()}.probe"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:  # a read-only mount passes os.access as root
        return f"directory {directory} is not writable ({exc.strerror})"
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
