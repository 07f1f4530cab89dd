"""Find the cgroup v2 directory the probe attaches to."""

from __future__ import annotations

from pathlib import Path

from kmeshd.errors import ConfigError, UnavailableError
from kmeshd.kernel.statfs import CGROUP2_SUPER_MAGIC, fs_magic


def cgroup2_mounts(mountinfo: str) -> list[Path]:
    """Mount points of cgroup2 filesystems in /proc/self/mountinfo text."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split(" ", 1)[0] == "cgroup2":
            mounts.append(Path(fields[0].split(" ")[4]))
    return mounts


def choose(mounts: list[Path]) -> Path | None:
    """/sys/fs/cgroup on a pure v2 host, else the hybrid layout's unified mount."""
    for preferred in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if preferred in mounts:
            return preferred
    return mounts[0] if mounts else None


def directory(setting: str, where: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    """The directory `bpf.cgroup` names; `where` prefixes errors ("file: bpf.cgroup")."""
    if setting != "auto":
        path = Path(setting)
        if not path.is_dir() or fs_magic(path) != CGROUP2_SUPER_MAGIC:
            raise ConfigError(
                [
                    f"{where}: {setting} is not a cgroup v2 directory"
                    ' (use "auto", or a directory on a cgroup2 mount)'
                ]
            )
        return path
    found = choose(cgroup2_mounts(mountinfo.read_text()))
    if found is None:
        raise UnavailableError(
            "no cgroup v2 hierarchy is mounted: mount one "
            "(mount -t cgroup2 none /sys/fs/cgroup/unified) or boot with "
            "systemd.unified_cgroup_hierarchy=1"
        )
    return found
