"""The /metrics listener under faults: a listener thread that dies comes back, a request
that raises is logged and counted, and silent or crowding clients cannot stop scrapes."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from kmeshd.export import http
from kmeshd.export.http import Body, MetricsServer


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return bytes(r.read())


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    s = MetricsServer("127.0.0.1", 0)
    s.publish(Body())
    yield s
    s.close()


def silent_client(port: int) -> socket.socket:
    """A client that connects and never sends a request."""
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_the_listener_thread_comes_back_after_it_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = http._Server.serve_forever
    failures = [OSError(24, "Too many open files")]

    def serve_forever(self: http._Server, poll_interval: float = 0.5) -> None:
        if failures:
            raise failures.pop()
        real(self, poll_interval)

    monkeypatch.setattr(http._Server, "serve_forever", serve_forever)
    with caplog.at_level(logging.ERROR, logger="kmeshd"):
        s = MetricsServer("127.0.0.1", 0)
        try:
            assert b"process_cpu_seconds_total" in scrape(s.port)  # waits in the backlog
            assert s.restarts == 1
        finally:
            s.close()
    assert caplog.records[0].getMessage() == (
        "thread metrics-http failed: OSError(24, 'Too many open files'); restarting it"
        " (1 restarts so far)"
    )


def test_a_request_that_raises_is_logged_and_the_next_one_answered(
    server: MetricsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import generate_latest as real

    calls = []

    def generate_latest(registry: object) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("no room")
        return real(registry)  # type: ignore[arg-type]

    monkeypatch.setattr(http, "generate_latest", generate_latest)
    with caplog.at_level(logging.ERROR, logger="kmeshd"):
        with pytest.raises(OSError):  # the connection closes without an answer
            scrape(server.port)
        assert b"process_cpu_seconds_total" in scrape(server.port)
    assert server._server.failed == 1
    assert "a /metrics request from ('127.0.0.1'," in caplog.text
    assert "MemoryError('no room')" in caplog.text


def test_silent_clients_do_not_stop_scrapes_and_are_let_go(
    server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http._Handler, "timeout", 0.5)
    silent = [silent_client(server.port) for _ in range(10)]
    try:
        started = time.monotonic()
        assert b"process_cpu_seconds_total" in scrape(server.port)
        assert time.monotonic() - started < 0.5  # answered at once, not after them
        for sock in silent:  # each is closed by the server after its timeout
            assert sock.recv(1) == b""
        assert time.monotonic() - started < 3.0
    finally:
        for sock in silent:
            sock.close()


def test_past_max_clients_a_connection_is_refused_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http, "MAX_CLIENTS", 3)
    monkeypatch.setattr(http._Handler, "timeout", 1.0)
    s = MetricsServer("127.0.0.1", 0)
    s.publish(Body())
    silent = [silent_client(s.port) for _ in range(3)]
    try:
        time.sleep(0.2)  # all three taken in
        extra = silent_client(s.port)
        assert extra.recv(1) == b""  # closed unanswered at once
        extra.close()
        assert s.refused == 1
        for sock in silent:
            assert sock.recv(1) == b""  # their timeout frees the slots
        assert b"process_cpu_seconds_total" in scrape(s.port)
    finally:
        for sock in silent:
            sock.close()
        s.close()
