"""kmeshd.supervise: a thread that fails is logged, counted and started again; a main-loop
step that fails is logged and counted, and the caller goes on."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from kmeshd.backoff import Backoff
from kmeshd.supervise import Guard, Supervised


def wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_thread_that_raises_is_logged_once_counted_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop, runs = threading.Event(), []

    def target() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise ValueError(f"bad input {len(runs)}")
        stop.wait()  # the third run works until stopped

    with caplog.at_level(logging.ERROR, logger="kmeshd"):
        thread = Supervised("watcher", target, stop, cap=0.05).start()
        wait_until(lambda: len(runs) == 3)
        stop.set()
        thread.join(5)
    assert thread.restarts == 2
    assert [r.getMessage() for r in caplog.records] == [
        "thread watcher failed: ValueError('bad input 1'); restarting it (1 restarts so far)"
    ]  # the second failure within the minute: counted, not logged
    assert caplog.records[0].exc_info is not None
    assert "raise ValueError" in caplog.text  # the traceback


def test_a_thread_that_returns_unasked_is_restarted() -> None:
    stop, runs = threading.Event(), []

    def target() -> None:
        runs.append(1)
        if len(runs) > 1:
            stop.wait()

    thread = Supervised("poller", target, stop, cap=0.05).start()
    wait_until(lambda: len(runs) == 2)
    stop.set()
    thread.join(5)
    assert thread.restarts == 1


def test_a_stop_during_the_backoff_ends_the_thread_at_once() -> None:
    stop = threading.Event()

    def target() -> None:
        raise RuntimeError("down")

    thread = Supervised("kubelet", target, stop, cap=3600.0).start()
    wait_until(lambda: thread.restarts >= 1)
    started = time.monotonic()
    stop.set()
    thread.join(5)
    assert time.monotonic() - started < 1.0
    assert not thread._thread.is_alive()


def test_the_backoff_starts_afresh_after_a_healthy_run() -> None:
    """A thread that ran a minute before failing waits 0.5 s at most, not the long delay
    its earlier string of failures had reached."""
    now = [0.0]
    stop = threading.Event()
    waits: list[float] = []
    healthy_after = 5

    def target() -> None:
        if len(waits) == healthy_after:
            now[0] += 120.0  # this run lasts two minutes
        if len(waits) > healthy_after:
            stop.set()
            return
        raise RuntimeError("x")

    thread = Supervised("w", target, stop, cap=30.0, clock=lambda: now[0])
    thread._stop = _Recording(stop, waits)  # type: ignore[assignment]
    thread._run()
    assert waits[healthy_after - 1] > 2.0  # 0.5 doubling: the fifth wait is 4..8 s
    assert waits[healthy_after] <= 0.5


class _Recording:
    """A stop event whose waits are recorded, not slept."""

    def __init__(self, event: threading.Event, waits: list[float]) -> None:
        self._event, self._waits = event, waits

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        self._waits.append(seconds)
        return self._event.is_set()


def test_the_backoff_never_overflows_however_long_a_source_is_down() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rng=lambda: 1.0)
    backoff.failures = 100_000  # 2.0**100000 would raise OverflowError
    assert backoff.next() == 30.0


def test_a_guarded_step_that_raises_is_counted_and_returns_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    guard = Guard(lambda: now[0])

    def fail() -> int:
        raise ZeroDivisionError("division by zero")

    with caplog.at_level(logging.ERROR, logger="kmeshd"):
        assert guard.run("publish", fail) is None
        assert guard.run("publish", fail) is None  # logged at most once a minute
        now[0] = 61.0
        assert guard.run("publish", fail) is None
        assert guard.run("drain", lambda: 7) == 7
    assert dict(guard.errors) == {"publish": 3}
    assert [r.getMessage() for r in caplog.records] == [
        "publish failed: ZeroDivisionError('division by zero'); carrying on"
        " (1 failures of it so far)",
        "publish failed: ZeroDivisionError('division by zero'); carrying on"
        " (3 failures of it so far)",
    ]
