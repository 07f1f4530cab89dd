"""Checks on the directories kmeshd writes to (textfile, access log)."""

from __future__ import annotations

import os
from pathlib import Path


def check_directory(path: Path) -> str | None:
    """Why the textfile cannot be written there, or None."""
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
