"""What the Kubernetes sources tell the daemon, and how it lands in the cache.

Sources run in their own threads and only ever put these messages on a queue; the main
thread applies them (`apply`), so the cache has a single writer. Data flows one way:
HTTP -> source thread -> queue -> cache -> lookups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kmeshd.identity.cache import IdentityCache


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


Update = Listed | Changed | Deleted | SourceState


def apply(cache: IdentityCache, update: Update, now: float) -> None:
    """One message into the cache. SourceState is the daemon's to keep, not the cache's."""
    if isinstance(update, Listed):
        cache.replace(update.resource, update.source, update.values, now)
    elif isinstance(update, Changed):
        cache.put(update.resource, update.source, update.value, now)
    elif isinstance(update, Deleted):
        cache.delete(update.resource, update.source, update.key, now)
