"""Finding the cgroup v2 directory: pure mountinfo parsing, and errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmeshd.errors import ConfigError, UnavailableError
from kmeshd.kernel import cgroup

HYBRID = """\
25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:28 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
33 31 0:29 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,name=systemd
"""
PURE = "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_ONLY = "33 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"


@pytest.mark.parametrize(
    ("mountinfo", "expected"),
    [
        (HYBRID, Path("/sys/fs/cgroup/unified")),
        (PURE, Path("/sys/fs/cgroup")),
        (PURE + "40 25 0:40 / /mnt/other rw - cgroup2 cgroup2 rw\n", Path("/sys/fs/cgroup")),
        ("40 25 0:40 / /mnt/other rw - cgroup2 cgroup2 rw\n", Path("/mnt/other")),
        (V1_ONLY, None),
        ("", None),
    ],
)
def test_choose_cgroup2_mount(mountinfo: str, expected: Path | None) -> None:
    """auto picks /sys/fs/cgroup on pure v2, the unified mount on hybrid hosts, else any."""
    assert cgroup.choose(cgroup.cgroup2_mounts(mountinfo)) == expected


def test_no_cgroup2_is_unavailable(tmp_path: Path) -> None:
    """Without any cgroup v2 mount, start-up fails with the mount command to fix it."""
    info = tmp_path / "mountinfo"
    info.write_text(V1_ONLY)
    with pytest.raises(UnavailableError, match="mount -t cgroup2"):
        cgroup.directory("auto", "x", info)


def test_explicit_non_cgroup_directory_is_a_config_error(tmp_path: Path) -> None:
    """bpf.cgroup naming a plain directory is exit-78 material, with file and key."""
    with pytest.raises(ConfigError) as exc:
        cgroup.directory(str(tmp_path), "/etc/kmeshd/kmeshd.toml: bpf.cgroup")
    assert exc.value.problems == [
        f"/etc/kmeshd/kmeshd.toml: bpf.cgroup: {tmp_path} is not a cgroup v2 directory"
        ' (use "auto", or a directory on a cgroup2 mount)'
    ]
