"""Nothing in kmeshd dies silently.

- `Supervised`: a thread whose target, should it raise (or return while nobody asked it to
  stop), is logged with its traceback, counted, and started again after a backoff.
- `Guard`: the main loop's steps (drain, identity refresh, reload, publish). A step that
  raises is logged and counted, and the loop goes on to the next tick: one bad publish
  costs that publish, not the daemon.

Logs are throttled per thread or step (the traceback once a minute at most), counts are not:
kmeshd_thread_restarts_total{thread}, kmeshd_publish_errors_total and
kmeshd_loop_errors_total{step} (kmeshd(8)).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from kmeshd.backoff import Backoff
from kmeshd.ratelimit import LOG_EVERY_S, Throttle

log = logging.getLogger("kmeshd")

T = TypeVar("T")

LOOP_STEPS = ("drain", "identities", "reload")  # the main loop's steps, publish aside
# thread name -> restarts, for the whole process (kmeshd_thread_restarts_total): a thread
# replaced at a reload keeps its count, so the counter never goes back.
RESTARTS: collections.Counter[str] = collections.Counter()
HEALTHY_S = 60.0  # a thread that ran this long before failing starts its backoff afresh


class Supervised:
    """Runs `target` in a daemon thread named `name` until `stop` is set, restarting it
    after each failure with a backoff (0.5 s doubling to `cap`); `restarts` counts them."""

    def __init__(
        self,
        name: str,
        target: Callable[[], None],
        stop: threading.Event,
        cap: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.restarts = 0
        self._target = target
        self._stop = stop
        self._backoff = Backoff(cap=cap)
        self._clock = clock
        self._complaints = Throttle(LOG_EVERY_S, clock)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Supervised:
        RESTARTS[self.name] += 0  # exported from the start, at 0
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            try:
                self._target()
            except Exception as exc:
                self._failed(exc)
            else:
                if self._stop.is_set():
                    return
                self._failed(None)
            if self._clock() - started > HEALTHY_S:  # a new failure, not the same one again
                self._backoff.reset()
            self._stop.wait(self._backoff.next())

    def _failed(self, exc: Exception | None) -> None:
        self.restarts += 1
        RESTARTS[self.name] += 1
        if not self._complaints.ready():
            return
        what = "stopped" if exc is None else f"failed: {exc!r}"
        log.error(
            "thread %s %s; restarting it (%d restarts so far)",
            self.name,
            what,
            self.restarts,
            exc_info=exc,
        )


class Guard:
    """The main loop's steps: `run(step, fn)` calls fn; an exception is logged (with its
    traceback, at most once a minute per step) and counted in `errors[step]`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.errors: collections.Counter[str] = collections.Counter()
        self._clock = clock
        self._complaints: dict[str, Throttle] = {}

    def run(self, step: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except Exception as exc:
            self.errors[step] += 1
            throttle = self._complaints.setdefault(step, Throttle(LOG_EVERY_S, self._clock))
            if throttle.ready():
                log.error(
                    "%s failed: %r; carrying on (%d failures of it so far)",
                    step,
                    exc,
                    self.errors[step],
                    exc_info=exc,
                )
            return None
