"""The node-exporter textfile: written whole to a temp file, then renamed over the old one.

node-exporter reads only *.prom files, so the temp name ends differently and a reader
never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0644); raises OSError, leaving the old file intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: node-exporter runs as another user
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def check_directory(path: Path) -> str | None:
    """Why the textfile cannot be written there, or None."""
    directory = path.parent
    if not directory.is_dir():
        return f"directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable"
    probe = directory / f".{path.name}.{os.getpid()}.probe"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:  # a read-only mount passes os.access as root
        return f"directory {directory} is not writable ({exc.strerror})"
    return None
