"""Which TCP sockets are alive on this host, by socket cookie, in every network namespace.

The probe keeps per-socket state in a pinned hash map keyed by socket cookie, deleted by
the program when the socket closes. A socket that closes while no program is attached
(kmeshd stopped) leaves its entry behind; kmeshd removes those at start by comparing the
map with the cookies the kernel reports here. Cookies are never reused within a boot, so
an entry whose cookie is not alive belongs to a closed socket.

The kernel answers sock_diag (NETLINK_SOCK_DIAG) requests only about the network
namespace the netlink socket was created in, so a worker thread enters each namespace in
turn (setns affects only the calling thread) and asks there. Namespaces are found through
the processes in /proc and the nsfs bind mounts (`ip netns`, CNI) in mountinfo.

A process whose /proc/PID/ns/net may not be read (a supervisor with capabilities kmeshd
lacks) may still be in a namespace already covered. Its /proc/PID/net/tcp{,6} is
readable and names its sockets by inode: when each of those was in a dump, nothing was
missed; otherwise the answer would have a gap, and a gap makes live sockets look closed,
so the whole answer fails instead.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
IPPROTO_TCP = 6
TCP_TIME_WAIT = 6
TCP_NEW_SYN_RECV = 12
# Full sockets only. A TIME_WAIT entry is a mini socket that inherits the cookie of a full
# socket that has already closed (and whose state the probe deleted); a NEW_SYN_RECV entry
# is a request that has no state yet.
FULL_SOCKET_STATES = 0xFFFFFFFF & ~(1 << TCP_TIME_WAIT) & ~(1 << TCP_NEW_SYN_RECV)
CLONE_NEWNET = 0x40000000

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid.
_REQUEST = struct.Struct("=BBBBI48x")
# inet_diag_msg up to the cookie: family, state, timer, retrans, sport, dport, src, dst, if.
_COOKIE_OFFSET = 4 + 2 + 2 + 16 + 16 + 4
_COOKIE = struct.Struct("=II")  # idiag_cookie[2]: low word first, host order
# Then idiag_expires, idiag_rqueue, idiag_wqueue, idiag_uid, idiag_inode.
_INODE_OFFSET = _COOKIE_OFFSET + _COOKIE.size + 4 * 4
_INODE = struct.Struct("=I")
_PROC_NET_TIME_WAIT = "06"
T = TypeVar("T")


class SockDiagError(OSError):
    """The kernel refused a dump, or a namespace could not be entered."""


def dump_request(family: int, seq: int = 1) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump of every full TCP socket of `family`."""
    body = _REQUEST.pack(family, IPPROTO_TCP, 0, 0, FULL_SOCKET_STATES)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


def parse_messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise SockDiagError(f"malformed netlink message at byte {offset}")
        yield kind, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3  # NLMSG_ALIGN


def cookie_of(payload: bytes) -> int:
    """The socket cookie in an inet_diag_msg."""
    low, high = _COOKIE.unpack_from(payload, _COOKIE_OFFSET)
    return int(high) << 32 | int(low)


def inode_of(payload: bytes) -> int:
    """The socket's inode in an inet_diag_msg (what /proc/net/tcp shows)."""
    (inode,) = _INODE.unpack_from(payload, _INODE_OFFSET)
    return int(inode)


def cookies_from(datagrams: Iterable[bytes]) -> dict[int, int]:
    """cookie -> inode of the sockets in a dump's replies, up to its NLMSG_DONE."""
    cookies: dict[int, int] = {}
    for data in datagrams:
        for kind, payload in parse_messages(data):
            if kind == NLMSG_DONE:
                return cookies
            if kind == NLMSG_ERROR:
                (errno,) = struct.unpack_from("=i", payload)
                raise SockDiagError(-errno, f"sock_diag dump: {os.strerror(-errno)}")
            if kind == SOCK_DIAG_BY_FAMILY:
                cookies[cookie_of(payload)] = inode_of(payload)
    raise SockDiagError("sock_diag dump ended without NLMSG_DONE")


def _replies(sock: socket.socket) -> Iterator[bytes]:
    while True:
        yield sock.recv(1 << 20)


def dump_cookies() -> dict[int, int]:
    """cookie -> inode of every TCP socket (IPv4, IPv6) in the calling thread's namespace."""
    live: dict[int, int] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
            sock.send(dump_request(family))
            live |= cookies_from(_replies(sock))
    return live


def proc_net_inodes(text: str) -> set[int]:
    """Inodes of the full sockets in a /proc/net/tcp or tcp6 table (TIME_WAIT and
    request sockets show inode 0)."""
    inodes = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[3] != _PROC_NET_TIME_WAIT and fields[9] != "0":
            inodes.add(int(fields[9]))
    return inodes


def nsfs_mounts(mountinfo: str) -> list[str]:
    """Mount points of network namespaces bind-mounted somewhere (`ip netns add`, CNI)."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or not fields[3].startswith("net:["):
            continue
        separator = fields.index("-", 6)
        if fields[separator + 1] == "nsfs":
            points.append(_unescape(fields[4]))
    return points


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal."""
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


class Namespaces(NamedTuple):
    paths: dict[tuple[int, int], str]  # (st_dev, st_ino) -> a path to open it
    hidden: list[Path]  # /proc/PID of processes whose namespace may not be read


def namespace_paths(proc: Path = Path("/proc")) -> Namespaces:
    """One path per distinct network namespace, and the processes that hide theirs."""
    found = Namespaces({}, [])
    # Strings, not Path objects: this runs at every publish, over every process.
    root = str(proc)
    with os.scandir(root) as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    candidates: list[tuple[str, str | None]] = [(f"{root}/{pid}/ns/net", pid) for pid in pids]
    candidates += [(m, None) for m in nsfs_mounts((proc / "self" / "mountinfo").read_text())]
    for path, pid in candidates:
        try:
            st = os.stat(path)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process exited, or a mount went away: not a namespace now
        except PermissionError as exc:
            if pid is None:
                raise SockDiagError(exc.errno, f"cannot read {path}: {exc.strerror}") from exc
            found.hidden.append(proc / pid)
            continue
        found.paths.setdefault((st.st_dev, st.st_ino), path)
    return found


def check_hidden(hidden: Iterable[Path], seen_inodes: set[int]) -> None:
    """Raise SockDiagError unless every socket of each hidden process's namespace was seen."""
    for process in hidden:
        try:
            tables = [(process / "net" / name).read_text() for name in ("tcp", "tcp6")]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited
        except OSError as exc:
            raise SockDiagError(
                exc.errno, f"cannot see the network namespace of {process}: {exc.strerror}"
            ) from exc
        unseen = set().union(*map(proc_net_inodes, tables)) - seen_inodes
        if unseen:
            raise SockDiagError(
                f"cannot enter the network namespace of {process} (its /proc/.../ns/net is"
                f" not readable: CAP_SYS_PTRACE) and {len(unseen)} of its sockets are in no"
                " namespace that could be"
            )


def live_cookies() -> set[int]:
    """Cookies of every TCP socket on the host. Raises SockDiagError if any namespace
    cannot be read: a partial answer would make live sockets look closed."""
    dumps, hidden = in_each_namespace(dump_cookies)
    live: dict[int, int] = {}
    for dump in dumps:
        live |= dump
    check_hidden(hidden, set(live.values()))
    return set(live)


def in_each_namespace(
    action: Callable[[], T], on_error: Callable[[SockDiagError], None] | None = None
) -> tuple[list[T], list[Path]]:
    """`action()`'s results from inside each network namespace, and the processes whose
    namespace may not be read (see check_hidden). A namespace that cannot be entered
    raises SockDiagError, or is passed to `on_error` and skipped."""
    result: dict[str, tuple[list[T], list[Path]] | BaseException] = {}
    worker = threading.Thread(
        target=_collect, args=(action, on_error, result), name="kmeshd-namespaces"
    )
    worker.start()
    worker.join()
    outcome = result["outcome"]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _collect(
    action: Callable[[], T],
    on_error: Callable[[SockDiagError], None] | None,
    result: dict[str, tuple[list[T], list[Path]] | BaseException],
) -> None:
    """Runs in its own thread, so entering namespaces never moves the daemon's threads."""
    try:
        namespaces = namespace_paths()
        answers: list[T] = []
        for path in namespaces.paths.values():
            try:
                _enter(path)
            except SockDiagError as exc:
                if on_error is None:
                    raise
                on_error(exc)
                continue
            answers.append(action())
        result["outcome"] = (answers, namespaces.hidden)
    except BaseException as exc:  # handed to the caller's thread
        result["outcome"] = exc


def _enter(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SockDiagError(
            exc.errno, f"cannot open network namespace {path}: {exc.strerror}"
        ) from exc
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise SockDiagError(err, f"cannot enter network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
