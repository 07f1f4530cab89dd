"""How long to wait before retrying something that failed: the identity sources' polls
and watches against an apiserver or a kubelet that is down."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays between retries of a failing call: doubling from `base` up to `cap`, each
    drawn uniformly from its upper half ("equal jitter"), so that the nodes of a cluster
    whose apiserver came back do not all retry in the same second."""

    def __init__(
        self, base: float = 0.5, cap: float = 30.0, rng: Callable[[], float] = random.random
    ) -> None:
        self.base, self.cap = base, cap
        self._rng = rng
        self.failures = 0

    def next(self) -> float:
        # The exponent stops growing long before the cap stops mattering: 2.0**1024 raises
        # OverflowError, and a source can be down for thousands of retries.
        ceiling = min(self.cap, self.base * 2.0 ** min(self.failures, 60))
        self.failures += 1
        return ceiling / 2 + self._rng() * ceiling / 2

    def reset(self) -> None:
        self.failures = 0
