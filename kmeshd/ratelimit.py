"""Rate limits: a token bucket for how many access-log records user space may handle per
second, and a throttle for repeated log lines.

Records over the budget stay in the kernel's ring buffer; once it is full the kernel drops
new ones and counts them (kmeshd_events_lost_total). So overload costs counted records,
never a core of CPU taken from the node's real work.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second, at most `rate` saved up (one second's burst); 0 = unlimited."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def available(self) -> bool:
        if not self.rate:
            return True
        self._refill()
        return self._tokens >= 1

    def take(self) -> bool:
        """Spend one token; True while another one is left."""
        if not self.rate:
            return True
        self._tokens -= 1
        return self._tokens >= 1


LOG_EVERY_S = 60.0  # repeated run-time failures: at most one log line a minute each


class Throttle:
    """Lets one log line through per `interval` seconds, so a failing sink cannot flood logs."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: float | None = None

    def ready(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            return False
        self._last = now
        return True
