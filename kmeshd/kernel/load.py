"""Loading the probe: the privileged half of the kernel edge.

    load()   host checks, BTF defines, compile (build), closed-socket sweep (stale),
             attach (attach), and every map and link pinned under <pin_dir>/v<LAYOUT>

It needs what the daemon does not keep: CAP_BPF and CAP_PERFMON to load the programs,
CAP_NET_ADMIN to attach to the cgroup, CAP_SYS_ADMIN and CAP_SYS_PTRACE to look into every
network namespace for sockets that closed while no probe ran, and the kernel headers bcc
compiles against. The unit runs it as `kmeshd load` (ExecStartPre=+) and then the daemon
with none of that: the daemon opens what load pinned, by path (kernel.probe). `kmeshd run`
with those capabilities (root in a shell, the tests) loads in-process first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmeshd.errors import UnavailableError
from kmeshd.kernel import sockdiag
from kmeshd.kernel.attach import PROGRAM, attach, attach_sweep
from kmeshd.kernel.build import check_host, compile_probe, import_bcc, kernel_defines
from kmeshd.kernel.libbpf import LibBpf, RawMap
from kmeshd.kernel.pins import prepare_pin_dir
from kmeshd.kernel.stale import (
    CAP_SYS_ADMIN,
    effective_caps,
    may_enter_namespaces,
    sweep_closed_sockets,
)

log = logging.getLogger(__name__)

# Pinned by load itself (the rest the probe pins as bcc creates them): made anew at each
# load, so that what the daemon finds there belongs to the program attached now.
FRESH_MAPS = ("settings", "grace", "grace_inner", "records", "kept")
SWEEP_PIN = "sweep"  # the socket sweep's iterator link (bpf.live_updates)
LINK_PIN = "link"  # the sock_ops program's cgroup link

CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF = 12, 38, 39


def may_load(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process can load and attach the probe itself."""
    caps = effective_caps(status)
    has = [bool(caps >> cap & 1) for cap in (CAP_BPF, CAP_SYS_ADMIN, CAP_PERFMON, CAP_NET_ADMIN)]
    return (has[0] or has[1]) and has[2] and has[3]


def load(
    pin_dir: Path,
    cgroup_dir: Path,
    phase: Callable[[str], None] = lambda _: None,
    sweep: bool = True,
    max_flows: int = 65536,
    owner: tuple[int, int] | None = None,
) -> tuple[Path, int | None]:
    """Compile, attach and pin. Returns the layout's pin directory, and how many sockets
    that closed while no probe ran were forgotten (None: not looked for, see
    _forget_closed_sockets). `owner`: the uid and gid the pins are handed to, for a daemon
    that runs as a user of its own."""
    check_host()
    bcc = import_bcc()
    pins = prepare_pin_dir(pin_dir, max_flows)
    defines = kernel_defines(sweep)
    phase("compiling the BPF probe")
    bpf = compile_probe(bcc, pins, defines, max_flows)
    try:
        libbpf = LibBpf()
        sweep_link = attach_sweep(bcc, bpf) if sweep else None
        swept = _forget_closed_sockets(bpf, libbpf)
        _keep_keys(bpf, libbpf)
        for name in FRESH_MAPS:
            _pin(libbpf, _map_fd(bpf, name), pins / name)
        _pin_or_remove(libbpf, sweep_link, pins / SWEEP_PIN)
        phase(f"attaching the probe to {cgroup_dir}")
        prog = bpf.load_func(PROGRAM.encode(), bcc.BPF.SOCK_OPS)
        try:
            link_fd = attach(libbpf, prog.fd, cgroup_dir, pins / LINK_PIN)
        except OSError as exc:
            raise UnavailableError(f"cannot attach the probe to {cgroup_dir}: {exc}") from exc
        os.close(link_fd)
        if owner is not None:
            hand_over(pins, *owner)
    finally:
        bpf.cleanup()  # the pins hold the maps and links now
    return pins, swept


def _map_fd(bpf: Any, name: str) -> int:
    """The fd of a map bcc created (bcc names tables in bytes)."""
    return int(bpf[name.encode()].map_fd)


def _pin(libbpf: LibBpf, fd: int, path: Path) -> None:
    path.unlink(missing_ok=True)
    libbpf.check(libbpf.obj_pin(fd, os.fsencode(path)), f"pin {path}")


def _pin_or_remove(libbpf: LibBpf, fd: int | None, path: Path) -> None:
    if fd is None:
        path.unlink(missing_ok=True)
        return
    try:
        _pin(libbpf, fd, path)
    finally:
        os.close(fd)


def hand_over(pins: Path, uid: int, gid: int) -> None:
    """The daemon's user owns the pins: BPF_OBJ_GET checks a pin's file permissions. Only
    those it does not own yet: a chown changes a pin's ctime even when the owner stays, and
    the flows pin's ctime is part of the name counters are saved under (flows_origin)."""
    for path in (pins.parent, pins, *pins.iterdir()):
        st = path.stat()
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(path, uid, gid)


def _keep_keys(bpf: Any, libbpf: LibBpf) -> None:
    """Copy the flow keys the pinned map holds before the new program attaches into
    `kept`: only an earlier program wrote those (see Probe.keys_at_start)."""
    flows, kept = RawMap(libbpf, _map_fd(bpf, "flows")), RawMap(libbpf, _map_fd(bpf, "kept"))
    one = b"\x01"
    for key in flows:
        kept.insert(key, one)


def _forget_closed_sockets(bpf: Any, libbpf: LibBpf) -> int | None:
    """Sweep out sockets that closed while no probe ran, if this process may look into
    every network namespace (else `kmeshd sweep-sockets` does it); how many, or None."""
    if not may_enter_namespaces():
        log.info(
            "sockets that closed while kmeshd was stopped are left to `kmeshd"
            " sweep-sockets`: this process may not enter other network namespaces"
            " (CAP_SYS_ADMIN, CAP_SYS_PTRACE)"
        )
        return None
    return sweep_closed_sockets(
        RawMap(libbpf, _map_fd(bpf, "socks")),
        RawMap(libbpf, _map_fd(bpf, "unseen_closes")),
        sockdiag.live_cookies,
    )
