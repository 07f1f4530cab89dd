"""sd_notify messages over a real datagram socket; silence outside systemd."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmeshd.systemd import Notifier


@pytest.fixture
def notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def test_messages(notify_socket: tuple[str, socket.socket]) -> None:
    """Each call sends exactly its sd_notify message."""
    _, sock = notify_socket
    n = Notifier()
    n.status("compiling")
    n.extend_timeout(30)
    n.ready("attached")
    n.stopping()
    received = [sock.recv(4096).decode() for _ in range(4)]
    assert received == [
        "STATUS=compiling",
        "EXTEND_TIMEOUT_USEC=30000000",
        "READY=1\nSTATUS=attached",
        "STOPPING=1",
    ]


def test_reloading_carries_monotonic_usec(notify_socket: tuple[str, socket.socket]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC, as Type=notify-reload expects."""
    _, sock = notify_socket
    Notifier().reloading()
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) > 0


def test_watchdog_pings_at_half_the_period(
    notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With WATCHDOG_USEC set, the first loop turn pings; the next within half a period doesn't."""
    _, sock = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    n = Notifier()
    n.watchdog()
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_outside_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET every call is a no-op."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    n.ready("x")
    n.watchdog()
    n.stopping()
