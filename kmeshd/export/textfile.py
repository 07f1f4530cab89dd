"""The node-exporter textfile: the kmesh_* and kmeshd_* families, rewritten whole at each
publish as they are rendered (written aside and renamed, so node-exporter never reads half
a file).

Only those families: node-exporter exports process_* and python_*-like families of its
own, and duplicates would break its scrape. A write that fails keeps the previous file,
counts in `failures` (kmeshd_textfile_write_failures_total) and marks the sink down; the
error is logged at most once a minute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from kmeshd.files import AtomicFile
from kmeshd.ratelimit import LOG_EVERY_S, Throttle

log = logging.getLogger(__name__)

MODE = 0o644  # node-exporter runs as another user


class Textfile:
    """The textfile at `path`; `draft()` starts the next one."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = path
        self.up = True
        self.failures = 0
        self.write_seconds = 0.0  # the last draft's, from draft() to its close()
        self._clock = clock
        self._complaints = Throttle(LOG_EVERY_S, clock)

    def draft(self) -> Draft:
        return Draft(self)

    def _done(self, error: OSError | None, started: float) -> None:
        self.write_seconds = self._clock() - started
        self.up = error is None
        if error is None:
            return
        self.failures += 1
        if self._complaints.ready():  # once a minute, not every interval
            log.error("cannot write %s: %s", self.path, error)


class Draft:
    """The next textfile, written piece by piece; close() puts it in place. Never raises:
    the first error stops the writing and is what close() reports."""

    def __init__(self, textfile: Textfile) -> None:
        self._textfile = textfile
        self._started = textfile._clock()
        self._file: AtomicFile | None = None
        self._error: OSError | None = None
        try:
            self._file = AtomicFile(textfile.path, MODE)
        except OSError as exc:
            self._error = exc

    def write(self, data: bytes) -> None:
        if self._file is None:
            return
        try:
            self._file.write(data)
        except OSError as exc:
            self._error = exc
            self._file.abort()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.commit()
            except OSError as exc:
                self._error = exc
            self._file = None
        self._textfile._done(self._error, self._started)
