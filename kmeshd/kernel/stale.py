"""Sockets that closed while no probe was attached (kmeshd stopped, or being upgraded).

The probe keeps each tracked socket's state in the pinned `socks` map and deletes it at
the close. A socket that closes while no program is attached leaves its entry behind: the
sweep here removes those, comparing the map with the cookies of the sockets alive now
(sockdiag), and counts the closes of established ones in `unseen_closes`, so that opened
minus closed stays the number of open connections. `kmeshd load` runs it before it
attaches (it may enter every network namespace), and `kmeshd sweep-sockets` on demand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from kmeshd.kernel import sockdiag
from kmeshd.kernel.layout import SOCK_STATE, SockFlag
from kmeshd.kernel.libbpf import LibBpf, RawMap
from kmeshd.kernel.pins import layout_dir

log = logging.getLogger(__name__)

CAP_SYS_PTRACE, CAP_SYS_ADMIN = 19, 21
NOT_PINNED = -1


class SweptMap(Protocol):
    """What the sweep needs of a map (RawMap; a dict-backed fake in tests)."""

    def __iter__(self) -> Iterator[bytes]: ...
    def pop(self, key: bytes) -> bytes | None: ...
    def insert(self, key: bytes, value: bytes) -> bool: ...


def hand_over(unseen: SweptMap, flow: bytes, closes: int) -> bool:
    """Put `closes` of `flow` in the unseen_closes inbox in an entry of their own: the
    first free slot of the flow key's generation byte (BPF_NOEXIST), so that a daemon
    taking entries out meanwhile never loses or doubles one. False when all 256 slots of
    this flow are waiting already."""
    value = closes.to_bytes(8, sys.byteorder)
    return any(unseen.insert(flow[:-1] + bytes([slot]), value) for slot in range(256))


def sweep_closed_sockets(
    socks: SweptMap, unseen: SweptMap, live_cookies: Callable[[], set[int]]
) -> int | None:
    """Delete the state of sockets that closed while no probe was attached, and count the
    closes of the established ones in `unseen` (by flow). Returns how many were swept, or
    None when the live sockets could not be listed (then nothing is). Safe beside a running
    program (after a SIGKILL the old one still is): the keys are read before the live
    cookies, a cookie is never reused, and a close is counted only by whoever deletes the
    entry."""
    stale = {int.from_bytes(k, sys.byteorder): k for k in socks}
    if not stale:
        return 0
    try:
        alive = live_cookies()
    except OSError as exc:
        log.warning(
            "cannot list live sockets (%s): %d socket-state entries stay until a start "
            'that can; if the map fills, kmeshd_bpf_map_full_total{map="sockets"} rises',
            exc,
            len(stale),
        )
        return None
    swept = 0
    closes: dict[bytes, int] = {}
    for cookie in stale.keys() - alive:
        value = socks.pop(stale[cookie])
        if value is None:  # the old program closed it meanwhile, and counted it
            continue
        swept += 1
        if SOCK_STATE.integer(value, "flags") & SockFlag.ESTABLISHED:
            flow = SOCK_STATE.raw(value, "key")
            closes[flow] = closes.get(flow, 0) + 1
    lost = sum(n for flow, n in closes.items() if not hand_over(unseen, flow, n))
    if swept:
        log.info("forgot %d sockets that closed while kmeshd was stopped", swept)
    if lost:
        log.warning(
            "%d closes of sockets closed while kmeshd was stopped are not counted:"
            " the unseen_closes map is full",
            lost,
        )
    return swept


def effective_caps(status: Path = Path("/proc/self/status")) -> int:
    """This process's effective capabilities, as a bit set (0 when the kernel says none)."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def may_enter_namespaces(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process has the capabilities the sweep needs (see sockdiag)."""
    effective = effective_caps(status)
    return all(effective >> cap & 1 for cap in (CAP_SYS_PTRACE, CAP_SYS_ADMIN))


def sweep_pinned(pin_dir: Path) -> int | None:
    """`kmeshd sweep-sockets`: sweep the pinned maps of a running (or stopped) kmeshd, as
    sweep_closed_sockets does; NOT_PINNED when there are no such maps."""
    pins = layout_dir(pin_dir)
    if not (pins / "socks").exists():
        return NOT_PINNED
    libbpf = LibBpf()
    with contextlib.ExitStack() as fds:
        maps = []
        for name in ("socks", "unseen_closes"):
            fd = libbpf.open_pinned(pins / name)
            fds.callback(os.close, fd)
            maps.append(RawMap(libbpf, fd))
        return sweep_closed_sockets(maps[0], maps[1], sockdiag.live_cookies)
