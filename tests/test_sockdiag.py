"""sock_diag: requests, replies and namespace discovery as tables; live cookies for real."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys
import threading
import uuid

import pytest

from kmeshd import sockdiag
from kmeshd.probe import sweep_closed_sockets
from tests.netns import is_root, sh

SO_COOKIE = 57


def message(kind: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 2, 1, 0) + payload


def diag_msg(cookie: int) -> bytes:
    """An inet_diag_msg (72 bytes) whose only meaningful field is the cookie."""
    sockid = bytes(2 + 2 + 16 + 16 + 4) + struct.pack("=II", cookie & 0xFFFFFFFF, cookie >> 32)
    return bytes([10, 1, 0, 0]) + sockid + bytes(20)


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
    first = message(20, diag_msg(5)) + message(20, diag_msg(2**40 + 3))
    second = message(20, diag_msg(9)) + DONE
    after = message(20, diag_msg(11))  # never read: the dump ended
    assert sockdiag.cookies_from([first, second, after]) == {5, 2**40 + 3, 9}


def test_an_empty_dump_is_an_empty_set() -> None:
    assert sockdiag.cookies_from([DONE]) == set()


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


class FakeSocks(dict[int, int]):
    """The two things sweep_closed_sockets uses of a bcc table: keys() and Key."""

    class Key:
        def __init__(self, value: int) -> None:
            self.value = value

        def __hash__(self) -> int:
            return hash(self.value)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, FakeSocks.Key) and other.value == self.value


def fake_socks(cookies: list[int]) -> FakeSocks:
    table = FakeSocks()
    for c in cookies:
        table[FakeSocks.Key(c)] = 0  # type: ignore[index]
    return table


def test_sweep_removes_only_cookies_that_are_not_alive() -> None:
    table = fake_socks([1, 2, 3, 4])
    assert sweep_closed_sockets(table, lambda: {2, 4, 99}) == 2
    assert sorted(k.value for k in table) == [2, 4]  # type: ignore[attr-defined]


def test_sweep_keeps_everything_when_live_sockets_cannot_be_listed() -> None:
    def refuse() -> set[int]:
        raise sockdiag.SockDiagError(1, "cannot enter network namespace /proc/1/ns/net")

    table = fake_socks([1, 2])
    assert sweep_closed_sockets(table, refuse) == 0
    assert len(table) == 2


def test_sweep_of_an_empty_map_lists_nothing() -> None:
    def never() -> set[int]:
        raise AssertionError("not needed")

    assert sweep_closed_sockets(fake_socks([]), never) == 0


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
