"""The node-exporter textfile: the kmesh_* and kmeshd_* families, rewritten whole at each
publish (written aside and renamed, so node-exporter never reads half a file).

Only those families: node-exporter exports process_* and python_*-like families of its
own, and duplicates would break its scrape. A write that fails keeps the previous file,
counts in `failures` (kmeshd_textfile_write_failures_total) and marks the sink down; the
error is logged at most once a minute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from kmeshd.files import write_atomic
from kmeshd.ratelimit import LOG_EVERY_S, Throttle

log = logging.getLogger(__name__)

MODE = 0o644  # node-exporter runs as another user


class Textfile:
    """The textfile at `path`, rendered from `collector`."""

    def __init__(self, path: Path, collector: Collector, clock: Callable[[], float]) -> None:
        self.path = path
        self.up = True
        self.failures = 0
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)
        self._complaints = Throttle(LOG_EVERY_S, clock)

    def render(self) -> bytes:
        return generate_latest(self._registry)

    def write(self) -> None:
        """Replace the file with the collector's families now; never raises."""
        try:
            write_atomic(self.path, self.render(), MODE)
            self.up = True
        except OSError as exc:
            self.up = False
            self.failures += 1
            if self._complaints.ready():  # once a minute, not every interval
                log.error("cannot write %s: %s", self.path, exc)
