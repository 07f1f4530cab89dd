"""The daemon's lifecycle, and the one place that wires the stages together.

    startup()    identity source, sinks, /metrics listener, probe (compiled, attached),
                 first publish, READY=1
    run()        each tick: drain the ring buffer, reload on SIGHUP, refresh identities,
                 keep the kernel's known addresses, publish every metrics.interval,
                 WATCHDOG=1
    shutdown()   last drain and publish, detach, close; safe after a partial startup

    probe ──flows──> publish.Publisher ──> export (collector, textfile)
          └─records─> accesslog.records.RecordFeed ──> access-log sinks

What it runs on comes in as arguments: the kernel (the probe's maker), the identity
source's opener, the clock and systemd's notifier, so the whole lifecycle runs in tests
on fakes. Signals only set flags; the main loop acts on them on its next tick.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Protocol

from kmeshd import __version__
from kmeshd.accesslog.records import RecordFeed
from kmeshd.accesslog.sinks import Fanout, open_sinks
from kmeshd.aggregate import Ledger, Slots
from kmeshd.clock import Clock
from kmeshd.config import Config
from kmeshd.errors import ConfigError
from kmeshd.export.http import MetricsServer, open_listener
from kmeshd.export.textfile import Textfile
from kmeshd.export.webaccess import warn_if_exposed
from kmeshd.files import prepare_directory
from kmeshd.identity.model import Identities
from kmeshd.identity.sources import SYNC_TIMEOUT_S, IdentitySource, StaticSource
from kmeshd.kernel.memory import release_freed_memory
from kmeshd.known import KnownAddresses, KnownSetter
from kmeshd.publish import FlowReader, Publisher
from kmeshd.reload import Reload, SourceOpener, prepare
from kmeshd.supervise import Guard
from kmeshd.systemd import Notifier

log = logging.getLogger(__name__)


def settle_heap() -> None:
    """After start-up: collect the first lists' garbage once, give the freed heap back, and
    freeze what is left out of the cyclic collector's sight. An identity cache holds
    millions of objects that live for months; without the freeze, every full collection
    walks them all (hundreds of milliseconds each, more often the more pods change)."""
    gc.collect()
    release_freed_memory()
    gc.freeze()


TICK_S = 0.1  # the ring buffer is drained this often; also how late a signal is handled


class ProbeHandle(FlowReader, KnownSetter, Protocol):
    """What the daemon does with an attached probe (kernel.probe.Probe)."""

    @property
    def can_sweep(self) -> bool: ...
    def on_record(self, callback: Callable[[bytes], bool]) -> None: ...
    def drain(self) -> None: ...
    def want_records(self, on: bool) -> None: ...
    def want_live_updates(self, on: bool) -> None: ...
    def want_periodic_records(self, seconds: float) -> None: ...
    def close(self, detach: bool = True) -> None: ...


class Kernel(Protocol):
    """Where the probe comes from (kernel.probe.HostKernel)."""

    def cgroup(self, config: Config) -> Path:
        """The cgroup directory bpf.cgroup names; ConfigError or UnavailableError."""
        ...

    def start(self, config: Config, cgroup: Path, phase: Callable[[str], None]) -> ProbeHandle:
        """The probe compiled and attached to `cgroup`; `phase` hears each step."""
        ...


class Daemon:
    def __init__(
        self,
        config: Config,
        kernel: Kernel,
        open_source: SourceOpener,
        notifier: Notifier | None = None,
        clock: Clock = time,
    ) -> None:
        self.config = config
        self.notify = notifier or Notifier()
        self.clock = clock
        self._kernel = kernel
        self._open_source = open_source
        self.source: IdentitySource = StaticSource(Identities())
        self.feed = RecordFeed(
            Fanout(), self.source.view(), config.accesslog.max_rate, clock.monotonic
        )
        self.http: MetricsServer | None = None
        self.probe: ProbeHandle | None = None
        self.publisher: Publisher | None = None
        self.known: KnownAddresses | None = None
        self._stop = False
        self._reload = False
        self._source_status = ""
        self._reload_note = ""  # why the running config is not the file's, after a rejection
        self.guard = Guard(clock.monotonic)  # a step that raises is logged, counted, survived

    # -- startup -------------------------------------------------------------------------

    def startup(self) -> None:
        cfg = self.config
        self.notify.status("loading identities")
        self._use_source(self._open_source(cfg, None))
        self.feed.sinks.replace(open_sinks(cfg))
        textfile = self._textfile(cfg)
        state = self._state_file(cfg)
        cgroup_dir = self._kernel.cgroup(cfg)
        if cfg.metrics.listen:
            self.notify.status(f"listening on {cfg.metrics.listen}")
        self.http = open_listener(cfg)
        self.notify.extend_timeout(30)  # bcc takes seconds on a small host
        probe = self.probe = self._kernel.start(cfg, cgroup_dir, self.notify.status)
        probe.on_record(self.feed)
        self._tune_probe(cfg)
        self.known = KnownAddresses(probe, self.clock.monotonic)
        self.publisher = Publisher(
            probe,
            self._ledger(cfg),
            self.http,
            textfile,
            self.feed,
            self.known,
            self.clock,
            cfg.bpf.flow_expiry,
            state,
            self.guard,
            cfg.metrics.interval,
        )
        self.publisher.restore()
        if self._stop:  # a stop signal came while bcc compiled: shutdown() takes over
            return
        self.notify.status("waiting for the identity sources")
        self.source.wait_synced(
            SYNC_TIMEOUT_S, lambda: self.notify.extend_timeout(5), lambda: self._stop
        )
        if self._stop:
            return
        settle_heap()
        self.known.update(self.source, force=True)
        self._source_status = self.source.status()  # READY=1's STATUS says it first
        self.publish()
        status = f"probe attached to {cgroup_dir}; {self._listening()}; {self._source_status}"
        self.notify.ready(status)
        log.info("kmeshd %s running: %s", __version__, status)

    def _use_source(self, source: IdentitySource) -> None:
        self.source = source
        self.feed.view = source.view()
        source.start()  # Kubernetes sources sync while the probe compiles

    def _textfile(self, cfg: Config) -> Textfile | None:
        if not cfg.metrics.textfile:
            return None
        path = Path(cfg.metrics.textfile)
        prepare_directory(path, cfg.metrics.textfile_explicit, cfg.path, "metrics.textfile")
        return Textfile(path, self.clock.monotonic)

    @staticmethod
    def _state_file(cfg: Config) -> Path | None:
        if not cfg.metrics.state_file:
            return None
        path = Path(cfg.metrics.state_file)
        prepare_directory(path, cfg.metrics.state_file_explicit, cfg.path, "metrics.state_file")
        return path

    @staticmethod
    def _ledger(cfg: Config) -> Ledger:
        m = cfg.metrics
        slots = Slots(m.histograms)
        return Ledger(slots, m.max_series, m.series_ttl, m.connection_security_policy)

    def _tune_probe(self, cfg: Config) -> None:
        """What the kernel sends and counts, as `cfg` asks."""
        assert self.probe is not None
        self.probe.want_records(bool(self.feed.sinks.sinks))
        self.probe.want_live_updates(cfg.bpf.live_updates)
        self.probe.want_periodic_records(cfg.accesslog.periodic)

    def _tune_publisher(self, cfg: Config) -> None:
        """What a publish keeps and for how long, as `cfg` asks (reload)."""
        assert self.publisher is not None
        ledger, m = self.publisher.ledger, cfg.metrics
        ledger.policy = m.connection_security_policy
        ledger.max_series, ledger.series_ttl = m.max_series, m.series_ttl
        self.publisher.flow_expiry = cfg.bpf.flow_expiry
        self.publisher.interval = m.interval

    def _listening(self) -> str:
        return f"/metrics on {self.config.metrics.listen}" if self.http else "no /metrics listener"

    # -- run -----------------------------------------------------------------------------

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, _sig: int, _frame: FrameType | None) -> None:
        self.stop()

    def _on_hup(self, _sig: int, _frame: FrameType | None) -> None:
        self._reload = True

    def stop(self) -> None:
        """Ask the main loop (or a start-up in progress) to end, as SIGTERM does."""
        self._stop = True

    def run(self) -> None:
        assert self.probe is not None and self.known is not None, "startup() first"
        clock = self.clock
        next_publish = clock.monotonic() + self.config.metrics.interval
        while not self._stop:
            self.feed.wall_offset_ns = clock.time_ns() - clock.monotonic_ns()
            if self.feed.begin():  # else records stay queued in the kernel
                self.guard.run("drain", self.probe.drain)
            if self._reload:
                self.guard.run("reload", self.reload)
            self.guard.run("identities", self._refresh_identities)
            if clock.monotonic() >= next_publish:
                self.guard.run("publish", self.publish)
                next_publish = max(next_publish + self.config.metrics.interval, clock.monotonic())
            self.notify.watchdog()
            clock.sleep(max(0.0, min(TICK_S, next_publish - clock.monotonic())))

    def _refresh_identities(self) -> None:
        assert self.known is not None
        self.source.refresh(self.clock.monotonic())
        self.known.update(self.source)

    def publish(self) -> None:
        assert self.publisher is not None, "startup() first"
        self.publisher.publish(self.source.view(), self.source.up(), self.source.rejected())
        self._tell_sources()

    def _tell_sources(self) -> None:
        """STATUS= follows the identity sources: `systemctl status` says what is missing,
        and, until a reload succeeds, that the last one was rejected."""
        status = self.source.status()
        if status != self._source_status:
            self._source_status = status
            self.notify.status(self._running_status())

    def _running_status(self) -> str:
        return "; ".join(filter(None, ("running", self._source_status, self._reload_note)))

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read config and inventory; a bad new config keeps the old one."""
        self._reload = False
        self.notify.reloading()
        try:
            self._reload_note = self._reload_config()
        except Exception:
            self._reload_note = "reload failed: running the previous config"
            raise  # logged and counted by the guard
        finally:
            self.notify.ready(self._running_status())  # systemd never stays "reloading"

    def _reload_config(self) -> str:
        """The reload itself; what STATUS= should add to "running"."""
        try:
            new = prepare(self.config, self.source, self._open_source)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected, keeping the running config: %s", problem)
            # logrotate's SIGHUP still means "reopen": the old file is no longer the log.
            self.feed.sinks.reopen()
            return "reload rejected: running the previous config"
        self._apply(new)
        return ""

    def _apply(self, new: Reload) -> None:
        assert self.probe is not None and self.known is not None
        for key in new.restart_keys:
            log.warning("%s changed: takes effect after a restart", key)
        if new.config.bpf.live_updates and not self.probe.can_sweep:
            log.warning("bpf.live_updates turned on: takes effect after a restart")
        if new.sinks is not None:
            self.feed.sinks.replace(new.sinks)
        else:
            self.feed.sinks.reopen()
        if new.source is not None:
            self.source.close()
            self._use_source(new.source)
        if self.http is not None:
            self.http.use(new.access)
            warn_if_exposed(self.http.address, new.access, new.config.metrics.listen)
        self.feed.limit(new.config.accesslog.max_rate)
        self._tune_probe(new.config)
        self._tune_publisher(new.config)
        self.known.update(self.source, force=True)
        self.config = new.config
        log.info("reloaded %s", new.config.path)

    # -- shutdown ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Final publish, detach, close. Safe after a partial startup."""
        self.notify.stopping()
        if self.probe is not None:
            # Whatever is queued is written, past the budget: at most a ring buffer's worth
            # (about 40,000 records, a second or two), and nothing is left behind unwritten.
            self.feed.limit(0)
            self.feed.begin(None)
            self.guard.run("drain", self.probe.drain)
            self.guard.run("publish", self.publish)
            if self.publisher is not None:
                self.publisher.save()
            self.probe.close(detach=True)
            self.probe = None
        if self.http is not None:
            self.http.close()
        self.source.close()
        self.feed.sinks.close()
        sys.stdout.flush()
