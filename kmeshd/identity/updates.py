"""What the Kubernetes sources tell the daemon, and how it lands in the cache.

Sources run in their own threads and only ever put these messages on a queue; the main
thread applies them (`apply`), so the cache has a single writer. Data flows one way:
HTTP -> source thread -> queue -> cache -> lookups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kmeshd.identity.cache import IdentityCache
from kmeshd.identity.client import printable
from kmeshd.ratelimit import LOG_EVERY_S, Throttle

log = logging.getLogger("kmeshd")


@dataclass(frozen=True, slots=True)
class Listed:
    """Everything `source` has of `resource` now: what it no longer has, it deleted."""

    source: str
    resource: str
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Changed:
    source: str
    resource: str
    value: Any


@dataclass(frozen=True, slots=True)
class Deleted:
    source: str
    resource: str
    key: str | tuple[str, str]  # a pod's uid, or (namespace, name)


@dataclass(frozen=True, slots=True)
class SourceState:
    """A source's last sync of `resource` worked (`error` empty) or failed (why)."""

    source: str
    resource: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class Rejected:
    """`source` skipped `count` objects of `resource` that were not valid."""

    source: str
    resource: str
    count: int


Update = Listed | Changed | Deleted | SourceState | Rejected


def apply(cache: IdentityCache, update: Update, now: float) -> None:
    """One message into the cache. SourceState is the daemon's to keep, not the cache's;
    the counts of Rejected live in the cache, which a reload keeps."""
    if isinstance(update, Listed):
        cache.replace(update.resource, update.source, update.values, now)
    elif isinstance(update, Changed):
        cache.put(update.resource, update.source, update.value, now)
    elif isinstance(update, Deleted):
        cache.delete(update.resource, update.source, update.key, now)
    elif isinstance(update, Rejected):
        key = (update.source, update.resource)
        cache.rejected[key] = cache.rejected.get(key, 0) + update.count


class Crashes:
    """An identity thread's unforeseen failures: each logged with its traceback, the same
    one again at most once a minute (not at every retry); the source's error message."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._last = ""
        self._again = Throttle(LOG_EVERY_S)

    def seen(self, exc: Exception) -> str:
        """Log `exc` (call from its except block); returns the error to report."""
        text = printable(f"{type(exc).__name__}: {exc}")
        if self._again.ready() or text != self._last:
            log.exception("%s: unexpected failure, starting over: %s", self.what, text)
            self._last = text
        return (
            f"unexpected failure ({text}), starting over: a kmeshd bug; please report it"
            " with the traceback logged"
        )
