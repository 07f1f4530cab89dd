"""The pin directory: where the probe's maps and link outlive the daemon.

    <bpf.pin_dir>/v<LAYOUT>/   flows, known_addrs, stats, socks, unseen_closes (maps),
                               link (the sock_ops program's cgroup link)

Kernel state outlives the process, so a restarted daemon re-opens the same counters. One
directory per layout version: a daemon never reads maps whose structs differ from its
own, and it removes those of other layouts, whose program must not keep counting beside
its own.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from kmeshd.errors import UnavailableError
from kmeshd.kernel.layout import LAYOUT
from kmeshd.kernel.libbpf import LibBpf
from kmeshd.kernel.statfs import BPF_FS_MAGIC, fs_magic

log = logging.getLogger(__name__)


def layout_dir(pin_dir: Path) -> Path:
    """Where this layout's maps and link are pinned."""
    return pin_dir / f"v{LAYOUT}"


def is_bpffs(path: Path) -> bool:
    """True when `path` (or the nearest existing parent) is on a bpf filesystem."""
    while not path.exists():
        path = path.parent
    return fs_magic(path) == BPF_FS_MAGIC


def prepare_pin_dir(pin_dir: Path, max_flows: int | None = None) -> Path:
    """This layout's directory, created; other layouts' pins removed, and the maps sized
    by `max_flows` removed when it changed (bcc would reuse a pinned map of another size)."""
    if not is_bpffs(pin_dir):
        raise UnavailableError(
            f"{pin_dir} is not on a BPF filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) "
            "or set bpf.pin_dir"
        )
    pins = layout_dir(pin_dir)
    pins.mkdir(parents=True, exist_ok=True, mode=0o700)
    for other in pin_dir.iterdir():
        if other != pins and re.fullmatch(r"v\d+", other.name):
            # An older kmeshd's maps and link: its program must not keep counting beside
            # ours. Unpinning the link detaches it; its counters start again from zero.
            log.warning("removing the probe and maps of another kmeshd layout in %s", other)
            remove_pins(other)
    if max_flows is not None:
        resize_flows(pins, max_flows)
    return pins


FLOWS_SIZED = ("flows", "unseen_closes")  # the maps of bpf.max_flows entries


def resize_flows(pins: Path, max_flows: int) -> None:
    """Unpin the flows maps when they were made with another bpf.max_flows: the probe then
    makes them anew, of the size asked for (their counts start again)."""
    flows = pins / "flows"
    if not flows.exists():
        return
    libbpf = LibBpf()
    fd = libbpf.open_pinned(flows)
    try:
        capacity = libbpf.map_capacity(fd)
    finally:
        os.close(fd)
    if capacity == max_flows:
        return
    log.warning(
        "bpf.max_flows changed from %d to %d: the kernel's flows map is made anew, its"
        " counts start again",
        capacity,
        max_flows,
    )
    for name in FLOWS_SIZED:
        (pins / name).unlink(missing_ok=True)


def remove_pins(pin_dir: Path) -> None:
    """Forget all kernel state (tests, and `kmeshd` uninstall): detaches a pinned link too."""
    shutil.rmtree(pin_dir, ignore_errors=True)
