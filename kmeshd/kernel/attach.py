"""Attaching the probe's two programs.

The sock_ops program is attached through a pinned bpf_link, so a restarted daemon
*replaces* its predecessor's program in one step (bpf_link_update): never two programs
counting every connection twice, never a moment with none. A link-based cgroup attachment
is always "multi", so other sock_ops users in this or any lower cgroup keep working.

The socket sweep is an iterator program, linked and pinned: the daemon runs it by reading
its pin (run_iterator).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kmeshd.errors import UnavailableError
from kmeshd.kernel.build import NO_SWEEP
from kmeshd.kernel.libbpf import LibBpf

log = logging.getLogger(__name__)

BPF_CGROUP_SOCK_OPS = 3  # enum bpf_attach_type
PROGRAM = "kmeshd_sockops"
SWEEP_PROGRAM = "bpf_iter__task_file"  # bcc attaches an iterator by its name: bpf_iter__<target>


def attach(libbpf: LibBpf, prog_fd: int, cgroup_dir: Path, pin: Path) -> int:
    """Replace the program behind our pinned link, or create and pin a new link."""
    cgroup_id = os.stat(cgroup_dir).st_ino
    if pin.exists():
        link_fd = libbpf.open_pinned(pin)
        if libbpf.link_cgroup_id(link_fd) == cgroup_id:
            libbpf.check(libbpf.link_update(link_fd, prog_fd, None), "bpf_link_update")
            log.info("replaced the probe left attached by a previous kmeshd")
            return link_fd
        # bpf.cgroup changed since that link was made: move, don't duplicate.
        libbpf.link_detach(link_fd)
        os.close(link_fd)
        pin.unlink()
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link_fd = libbpf.check(
            libbpf.link_create(prog_fd, fd, BPF_CGROUP_SOCK_OPS, None), "bpf_link_create"
        )
    finally:
        os.close(fd)
    libbpf.check(libbpf.obj_pin(link_fd, str(pin).encode()), f"pin {pin}")
    return link_fd


def attach_sweep(bcc: Any, bpf: Any) -> int:
    """Load the socket sweep and link it as an iterator over every open file: the link's
    fd."""
    from bcc.libbcc import lib

    try:
        program = bpf.load_func(SWEEP_PROGRAM.encode(), bcc.BPF.TRACING)
        return LibBpf.check(lib.bcc_iter_attach(program.fd, None, 0), "bpf_link_create")
    except Exception as exc:
        raise UnavailableError(
            f"the kernel refused the socket sweep, a file iterator program (Linux 5.12 or"
            f" newer): {exc}: {NO_SWEEP}"
        ) from exc


def run_iterator(pin: Path) -> bytes:
    """One pass of the iterator pinned at `pin` (opening a pinned iterator starts one, and
    needs no capability, only the pin's file permissions); what it wrote."""
    out = []
    fd = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 65536):
            out.append(chunk)
    finally:
        os.close(fd)
    return b"".join(out)
