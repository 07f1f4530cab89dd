"""sock_diag: requests, replies and namespace discovery as tables; live cookies for real."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
import threading
import uuid
from pathlib import Path

import pytest

from kmeshd.kernel import sockdiag
from tests.netns import is_root, sh

SO_COOKIE = 57


def message(kind: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 2, 1, 0) + payload


def diag_msg(cookie: int, inode: int = 0) -> bytes:
    """An inet_diag_msg (72 bytes) whose only meaningful fields are the cookie and inode."""
    sockid = bytes(2 + 2 + 16 + 16 + 4) + struct.pack("=II", cookie & 0xFFFFFFFF, cookie >> 32)
    return bytes([10, 1, 0, 0]) + sockid + bytes(16) + struct.pack("=I", inode)


DONE = message(sockdiag.NLMSG_DONE, struct.pack("=i", 0))


def test_dump_request_layout() -> None:
    """nlmsghdr (16) + inet_diag_req_v2 (56): TCP, every state but TIME_WAIT and
    NEW_SYN_RECV, a dump request."""
    req = sockdiag.dump_request(socket.AF_INET6, seq=7)
    assert len(req) == 72
    assert struct.unpack_from("=IHHII", req) == (72, 20, 0x301, 7, 0)
    assert struct.unpack_from("=BBBBI", req, 16) == (10, 6, 0, 0, 0xFFFFEFBF)
    assert req[24:] == bytes(48)


@pytest.mark.parametrize(
    "cookie", [0, 1, 0xFFFFFFFF, 0x1_0000_0000, 0x1234_5678_9ABC_DEF0, 2**64 - 1]
)
def test_cookie_is_read_low_word_first(cookie: int) -> None:
    assert sockdiag.cookie_of(diag_msg(cookie)) == cookie


def test_cookies_across_datagrams_until_done() -> None:
    first = message(20, diag_msg(5, 100)) + message(20, diag_msg(2**40 + 3, 2**32 - 1))
    second = message(20, diag_msg(9, 7)) + DONE
    after = message(20, diag_msg(11, 8))  # never read: the dump ended
    assert sockdiag.cookies_from([first, second, after]) == {5: 100, 2**40 + 3: 2**32 - 1, 9: 7}


def test_an_empty_dump_is_an_empty_set() -> None:
    assert sockdiag.cookies_from([DONE]) == {}


def test_a_kernel_error_is_raised_with_its_errno() -> None:
    err = message(sockdiag.NLMSG_ERROR, struct.pack("=i", -1) + bytes(16))
    with pytest.raises(sockdiag.SockDiagError) as exc:
        sockdiag.cookies_from([err])
    assert exc.value.errno == 1


def test_a_dump_without_done_is_an_error() -> None:
    """A truncated answer would make live sockets look closed: refuse it."""
    with pytest.raises(sockdiag.SockDiagError, match="without NLMSG_DONE"):
        sockdiag.cookies_from([message(20, diag_msg(1))])


def test_a_message_longer_than_its_datagram_is_an_error() -> None:
    broken = message(20, diag_msg(1))[:-8]
    with pytest.raises(sockdiag.SockDiagError, match="malformed"):
        list(sockdiag.parse_messages(broken))


MOUNTINFO = r"""22 1 0:21 / /proc rw,nosuid - proc proc rw
612 28 0:4 net:[4026532290] /run/netns/pod\040a rw shared:5 - nsfs nsfs rw
613 28 0:4 net:[4026532291] /var/run/netns/cni-1 rw - nsfs nsfs rw
614 28 0:4 mnt:[4026532292] /run/mntns rw - nsfs nsfs rw
615 28 0:4 net:[4026532293] /run/odd rw master:1 shared:2 - nsfs nsfs rw
"""


def test_nsfs_mounts_are_network_namespaces_only() -> None:
    assert sockdiag.nsfs_mounts(MOUNTINFO) == [
        "/run/netns/pod a",
        "/var/run/netns/cni-1",
        "/run/odd",
    ]


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1557 1 0
   1: 0100007F:3AAC 0100007F:07E8 01 00000000:00000000 00:00000000 00000000     0        0 30459 1 0
   2: 0100007F:3AAD 0100007F:07E8 06 00000000:00000000 03:00000fa0 00000000     0        0 0 3 0
   3: 0100007F:07E8 0100007F:3AAE 03 00000000:00000000 00:00000000 00000000     0        0 0 1 0
"""


def test_proc_net_inodes_of_full_sockets_only() -> None:
    """Listening and established sockets by inode; TIME_WAIT and requests have none."""
    assert sockdiag.proc_net_inodes(PROC_NET_TCP) == {1557, 30459}
    assert sockdiag.proc_net_inodes(PROC_NET_TCP.splitlines()[0]) == set()


def fake_proc(tmp_path: Path, tcp: str | None) -> Path:
    """/proc with one process, 42, whose ns/net is refused; its net/tcp is `tcp`
    (None: unreadable, as a directory)."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("")
    (proc / "42" / "ns").mkdir(parents=True)
    (proc / "42" / "net").mkdir()
    if tcp is None:
        (proc / "42" / "net" / "tcp").mkdir()  # reading it fails like a refusal
    else:
        (proc / "42" / "net" / "tcp").write_text(tcp)
        (proc / "42" / "net" / "tcp6").write_text(tcp.splitlines()[0])
    return proc


@pytest.mark.parametrize(
    ("error", "hidden"),
    [(FileNotFoundError, False), (ProcessLookupError, False), (PermissionError, True)],
)
def test_a_process_that_hides_its_namespace_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[OSError], hidden: bool
) -> None:
    """A process that exited is skipped; one whose namespace may not be read (no
    CAP_SYS_PTRACE, or a supervisor with more privilege) is kept for check_hidden."""
    proc = fake_proc(tmp_path, PROC_NET_TCP)
    real_stat = os.stat

    def stat(path: str) -> os.stat_result:
        if path.endswith("/42/ns/net"):
            raise error(errno.EACCES if error is PermissionError else errno.ENOENT, "refused")
        return real_stat(path)

    monkeypatch.setattr(os, "stat", stat)
    assert sockdiag.namespace_paths(proc) == ({}, [proc / "42"] if hidden else [])


def test_a_hidden_namespace_whose_sockets_were_all_seen_is_covered(tmp_path: Path) -> None:
    sockdiag.check_hidden([fake_proc(tmp_path, PROC_NET_TCP) / "42"], {1557, 30459, 9})


def test_a_hidden_namespace_with_an_unseen_socket_fails_the_answer(tmp_path: Path) -> None:
    """One socket in no dump: its namespace was missed, and the answer has a gap."""
    with pytest.raises(sockdiag.SockDiagError, match="1 of its sockets are in no namespace"):
        sockdiag.check_hidden([fake_proc(tmp_path, PROC_NET_TCP) / "42"], {1557})


def test_a_hidden_namespace_that_cannot_be_read_fails_the_answer(tmp_path: Path) -> None:
    with pytest.raises(sockdiag.SockDiagError, match="cannot see the network namespace"):
        sockdiag.check_hidden([fake_proc(tmp_path, None) / "42"], {1557, 30459})


def test_a_hidden_process_that_exited_is_no_gap(tmp_path: Path) -> None:
    sockdiag.check_hidden([tmp_path / "proc" / "43"], set())


def cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)


def listener_in(netns: str) -> socket.socket:
    """A listening socket created inside `netns` by a thread that entered it: afterwards
    no process is in that namespace, only its `ip netns` bind mount keeps it."""
    made: list[socket.socket] = []

    def enter_and_listen() -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        assert ctypes.CDLL(None, use_errno=True).setns(fd, sockdiag.CLONE_NEWNET) == 0
        os.close(fd)
        made.append(socket.create_server(("127.0.0.1", 0)))

    worker = threading.Thread(target=enter_and_listen)
    worker.start()
    worker.join()
    return made[0]


@pytest.mark.kernel
@pytest.mark.skipif(not is_root(), reason="entering network namespaces needs root")
def test_live_cookies_cover_every_namespace_and_no_closed_socket() -> None:
    netns = f"kmsd{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", netns)
    try:
        with listener_in(netns) as remote, socket.create_server(("127.0.0.1", 0)) as here:
            gone_sock = socket.create_server(("::1", 0), family=socket.AF_INET6)
            gone = cookie(gone_sock)
            gone_sock.close()
            live = sockdiag.live_cookies()
            assert cookie(remote) in live
            assert cookie(here) in live
            assert gone not in live
    finally:
        sh("ip", "netns", "del", netns, check=False)


@pytest.mark.kernel
@pytest.mark.skipif(not is_root(), reason="entering network namespaces needs root")
def test_live_cookies_include_ipv6_sockets() -> None:
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as v6:
        assert cookie(v6) in sockdiag.live_cookies()


def thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.mark.kernel
@pytest.mark.skipif(not is_root(), reason="entering network namespaces needs root")
def test_each_namespace_runs_the_action_and_hands_over_those_it_cannot_enter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The action runs once inside each namespace; a path that is no namespace (opens, but
    setns refuses it) and one that is gone go to on_error, and the rest still run. Without
    on_error the first of them is raised. The caller's thread never moves."""
    netns = f"kmsd{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", netns)
    try:
        other = os.stat(f"/run/netns/{netns}").st_ino
        here = thread_netns()
        not_a_namespace = tmp_path / "file"
        not_a_namespace.write_text("")
        gone = tmp_path / "gone"
        paths = {
            (0, 1): "/proc/self/ns/net",
            (0, 2): str(not_a_namespace),
            (0, 3): f"/run/netns/{netns}",
            (0, 4): str(gone),
        }
        monkeypatch.setattr(
            sockdiag, "namespace_paths", lambda: sockdiag.Namespaces(paths, [Path("/proc/1")])
        )
        errors: list[str] = []
        seen, hidden = sockdiag.in_each_namespace(thread_netns, lambda e: errors.append(str(e)))
        assert seen == [here, other]
        assert hidden == [Path("/proc/1")]
        assert errors == [
            f"[Errno 22] cannot enter network namespace {not_a_namespace}: Invalid argument",
            f"[Errno 2] cannot open network namespace {gone}: No such file or directory",
        ]
        with pytest.raises(sockdiag.SockDiagError) as exc:
            sockdiag.in_each_namespace(thread_netns)
        assert exc.value.errno == errno.EINVAL
        assert thread_netns() == here
    finally:
        sh("ip", "netns", "del", netns, check=False)
