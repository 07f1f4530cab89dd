"""The only place that wires the stages together: startup() / run() / shutdown().

    probe ──flows──> events.decode_flow ──> aggregate.fold ──> export (HTTP, textfile)
          └─records─> events.decode_record ──> labels.access_record ──> access-log sinks

Signals only set flags; the main loop acts on them on its next tick.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from prometheus_client import (
    CollectorRegistry,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

from kmeshd import __version__
from kmeshd.accesslog_sinks import Fanout, FileSink, JournaldSink, NullSink, Sink
from kmeshd.aggregate import Aggregate, add_unseen_closes
from kmeshd.config import Config, load_config, parse_listen
from kmeshd.errors import ConfigError, UnavailableError
from kmeshd.events import decode_flow, decode_flow_key, decode_record, encode_address
from kmeshd.export.http import MetricsServer
from kmeshd.export.metrics import Health, KmeshCollector, SinkHealth, Snapshot
from kmeshd.export.textfile import write_atomic
from kmeshd.identity.model import Identities
from kmeshd.identity.sources import (
    SYNC_TIMEOUT_S,
    IdentitySource,
    KubernetesSource,
    StaticSource,
    open_source,
)
from kmeshd.kernel import cgroup
from kmeshd.kernel.layout import Stat
from kmeshd.kernel.memory import release_freed_memory
from kmeshd.kernel.probe import Probe
from kmeshd.kernel.sockdiag import SockDiagError
from kmeshd.labels import access_record
from kmeshd.paths import check_directory
from kmeshd.ratelimit import LOG_EVERY_S, Throttle, TokenBucket
from kmeshd.systemd import Notifier

log = logging.getLogger("kmeshd")

TICK_S = 0.1  # the ring buffer is drained this often; also how late a signal is handled
KNOWN_EVERY_S = 1.0  # new pod addresses reach the kernel's known set within this


def prepare_directory(config: Config, key: str, path: Path, explicit: bool) -> None:
    """Create a default directory that is missing; an explicit one must exist and be writable."""
    if not path.parent.exists() and not explicit:
        missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
        for directory in reversed(missing):
            directory.mkdir(exist_ok=True)
            # 0755 whatever the umask (the unit sets 0077): node-exporter, another user,
            # must reach the textfile.
            directory.chmod(0o755)
    problem = check_directory(path)
    if problem:
        raise ConfigError([f"{config.path}: {key}: {problem} (create it or change {key})"])


def open_sinks(config: Config) -> Fanout:
    file_sink: Sink = NullSink("file")
    if config.accesslog.file:
        if config.accesslog.file != "-":
            path = Path(config.accesslog.file)
            prepare_directory(config, "accesslog.file", path, config.accesslog.file_explicit)
        try:
            file_sink = FileSink(config.accesslog.file)
        except OSError as exc:
            problem = f"cannot open {config.accesslog.file}: {exc.strerror}"
            raise ConfigError([f"{config.path}: accesslog.file: {problem}"]) from exc
    journal: Sink = JournaldSink() if config.accesslog.journald else NullSink("journald")
    return Fanout([file_sink, journal])


def bind_http(config: Config, registry: CollectorRegistry) -> MetricsServer | None:
    if not config.metrics.listen:
        return None
    host, port = parse_listen(config.metrics.listen)
    try:
        return MetricsServer(host, port, registry)
    except OSError as exc:
        where = f"metrics.listen {config.metrics.listen}"
        if exc.errno == errno.EADDRINUSE:
            raise UnavailableError(
                f"{where}: address already in use: stop the other listener or change "
                f"metrics.listen in {config.path}"
            ) from exc
        raise ConfigError(
            [f"{config.path}: metrics.listen: cannot listen: {exc.strerror}"]
        ) from exc


class Daemon:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notify = notifier or Notifier()
        self.collector = KmeshCollector()
        self.aggregate = Aggregate()
        self.source: IdentitySource = StaticSource(Identities())
        self._known_version = -1
        self._source_status = ""
        self._reload_note = ""  # why the running config is not the file's, after a rejection
        self._known_at = 0.0
        self.sinks = Fanout([])
        self.http: MetricsServer | None = None
        self.probe: Probe | None = None
        self.known_refused = 0
        self.records_handled = 0
        self.textfile_up = True
        self.textfile_failures = 0
        self.budget = TokenBucket(config.accesslog.max_rate)
        self._stop = False
        self._reload = False
        self._wall_offset = 0
        self._textfile_registry = CollectorRegistry(auto_describe=False)
        self._textfile_registry.register(self.collector)
        self._textfile_complaints = Throttle(LOG_EVERY_S)
        self._sweep_complaints = Throttle(LOG_EVERY_S)
        self._dropped_before: dict[str, int] = {}
        self._last_publish = 0.0
        self._publish_seconds = 0.0

    # -- startup -------------------------------------------------------------------------

    def startup(self) -> None:
        cfg = self.config
        self.notify.status("loading identities")
        self.source = open_source(cfg)
        self.source.start()  # Kubernetes sources sync while the probe compiles
        self.sinks = open_sinks(cfg)
        if cfg.metrics.textfile:
            path = Path(cfg.metrics.textfile)
            prepare_directory(cfg, "metrics.textfile", path, cfg.metrics.textfile_explicit)
        cgroup_dir = cgroup.directory(cfg.bpf.cgroup, f"{cfg.path}: bpf.cgroup")
        if cfg.metrics.listen:
            self.notify.status(f"listening on {cfg.metrics.listen}")
        self.http = bind_http(cfg, self._http_registry())
        self.notify.extend_timeout(30)  # bcc takes seconds on a small host
        self.probe = Probe.start(
            Path(cfg.bpf.pin_dir), cgroup_dir, self.notify.status, sweep=cfg.bpf.live_updates
        )
        self.probe.on_record(self._on_record)
        self.probe.want_records(bool(self.sinks.sinks))
        self.probe.want_live_updates(cfg.bpf.live_updates)
        self.probe.want_periodic_records(cfg.accesslog.periodic)
        if self._stop:  # a stop signal came while bcc compiled: shutdown() takes over
            return
        self.notify.status("waiting for the identity sources")
        self.source.wait_synced(
            SYNC_TIMEOUT_S, lambda: self.notify.extend_timeout(5), lambda: self._stop
        )
        if self._stop:
            return
        release_freed_memory()  # the first lists' JSON is garbage now
        self._update_known(force=True)
        self._source_status = self.source.status()  # READY=1's STATUS says it first
        self.publish()
        status = f"probe attached to {cgroup_dir}; {self._listening()}; {self._source_status}"
        self.notify.ready(status)
        log.info("kmeshd %s running: %s", __version__, status)

    def _update_known(self, force: bool = False) -> None:
        """Hand the kernel the addresses worth tracking when the identities changed, at
        most once a second: recomputing them over a large cluster costs milliseconds."""
        assert self.probe is not None
        now = time.monotonic()
        if not force and (
            self.source.known_version == self._known_version or now - self._known_at < KNOWN_EVERY_S
        ):
            return
        self._known_version, self._known_at = self.source.known_version, now
        addresses = self.source.view().known_addresses()
        self.known_refused = self.probe.set_known(encode_address(a) for a in addresses)

    def _listening(self) -> str:
        return f"/metrics on {self.config.metrics.listen}" if self.http else "no /metrics listener"

    def _http_registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        process_collector.ProcessCollector(registry=registry)
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
        return registry

    # -- run -----------------------------------------------------------------------------

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, _sig: int, _frame: FrameType | None) -> None:
        self._stop = True

    def _on_hup(self, _sig: int, _frame: FrameType | None) -> None:
        self._reload = True

    def run(self) -> None:
        assert self.probe is not None, "startup() first"
        next_publish = time.monotonic() + self.config.metrics.interval
        while not self._stop:
            self._wall_offset = time.time_ns() - time.monotonic_ns()
            if self.budget.available():  # else records stay queued in the kernel
                self.probe.drain()
            if self._reload:
                self.reload()
            self.source.refresh(time.monotonic())
            self._update_known()
            if time.monotonic() >= next_publish:
                self.publish()
                next_publish = max(next_publish + self.config.metrics.interval, time.monotonic())
            self.notify.watchdog()
            time.sleep(max(0.0, min(TICK_S, next_publish - time.monotonic())))

    def _on_record(self, raw: bytes) -> bool:
        self.records_handled += 1
        record = access_record(decode_record(raw), self.source.view(), self._wall_offset)
        self.sinks.write(record)
        return self.budget.take()

    # -- publish -------------------------------------------------------------------------

    def publish(self) -> None:
        assert self.probe is not None
        started = time.monotonic()
        self.probe.sweep(self._sweep_failed)
        unseen = {decode_flow_key(k): n for k, n in self.probe.unseen_closes().items()}
        flows = add_unseen_closes((decode_flow(k, v) for k, v in self.probe.flows()), unseen)
        policy = self.config.metrics.connection_security_policy
        self.aggregate.fold(flows, self.source.view(), policy)
        stats = self.probe.stats()
        self._last_publish = time.time()
        agg = self.aggregate
        self.collector.update(
            Snapshot(
                dict(agg.workload),
                dict(agg.service),
                self._health(stats, sum(unseen.values())),
                dict(agg.active_workload),
                dict(agg.active_service),
            )
        )
        self._write_textfile()
        self._publish_seconds = time.monotonic() - started
        self._tell_sources()

    def _sweep_failed(self, exc: SockDiagError) -> None:
        """A namespace the sweep could not enter: its connections' bytes come at close."""
        if self._sweep_complaints.ready():
            log.warning("socket sweep: %s; its open connections count at close only", exc)

    def _tell_sources(self) -> None:
        """STATUS= follows the identity sources: `systemctl status` says what is missing,
        and, until a reload succeeds, that the last one was rejected."""
        status = self.source.status()
        if status != self._source_status:
            self._source_status = status
            self.notify.status(self._running_status())

    def _running_status(self) -> str:
        return "; ".join(filter(None, ("running", self._source_status, self._reload_note)))

    def _health(self, stats: dict[Stat, int], unseen_closes: int) -> Health:
        sinks = [
            SinkHealth(s.name, s.up, s.dropped + self._dropped_before.get(s.name, 0))
            for s in self.sinks.sinks
        ]
        if self.config.metrics.textfile:
            sinks.append(SinkHealth("textfile", self.textfile_up, None))
        return Health(
            version=__version__,
            events={
                "opened": stats[Stat.OPENED],
                "closed": stats[Stat.CLOSED],
                "failed": stats[Stat.FAILED],
            },
            events_lost=stats[Stat.RINGBUF_LOST],
            records=self.records_handled,
            map_full={
                "flows": stats[Stat.FLOWS_FULL],
                "sockets": stats[Stat.SOCKS_FULL],
                "known_addrs": self.known_refused,
            },
            unattributed=stats[Stat.UNATTRIBUTED] + self.aggregate.unattributed,
            unseen_closes=unseen_closes,
            sinks=tuple(sinks),
            textfile_failures=self.textfile_failures if self.config.metrics.textfile else None,
            sources=self.source.up(),
            last_publish=self._last_publish,
            publish_seconds=self._publish_seconds,
        )

    def textfile_bytes(self) -> bytes:
        """Only kmesh_* and kmeshd_*: node-exporter exports process_*/python_* itself."""
        return generate_latest(self._textfile_registry)

    def _write_textfile(self) -> None:
        if not self.config.metrics.textfile:
            return
        try:
            write_atomic(Path(self.config.metrics.textfile), self.textfile_bytes())
            self.textfile_up = True
        except OSError as exc:
            self.textfile_up = False
            self.textfile_failures += 1
            if self._textfile_complaints.ready():  # once a minute, not every interval
                log.error("cannot write %s: %s", self.config.metrics.textfile, exc)

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read config and inventory; a bad new config keeps the old one."""
        self._reload = False
        self.notify.reloading()
        try:
            new = load_config(self.config.path, explicit=True)
            source = self._reloaded_source(new)
            sinks = open_sinks(new) if new.accesslog != self.config.accesslog else None
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected, keeping the running config: %s", problem)
            # logrotate's SIGHUP still means "reopen": the old file is no longer the log.
            self.sinks.reopen()
            self._reload_note = "reload rejected: running the previous config"
            self.notify.ready(self._running_status())
            return
        self._apply(new, source, sinks)
        self._reload_note = ""
        self.notify.ready(self._running_status())

    def _reloaded_source(self, new: Config) -> IdentitySource:
        """The inventory is read again; Kubernetes sources are restarted only when their
        settings changed, keeping the identities already known."""
        unchanged = (
            new.identity == self.config.identity and new.kubernetes == self.config.kubernetes
        )
        if isinstance(self.source, KubernetesSource) and unchanged:
            return self.source
        return open_source(new, previous=self.source)

    def _apply(self, new: Config, source: IdentitySource, sinks: Fanout | None) -> None:
        for key in ("metrics.listen", "bpf.cgroup", "bpf.pin_dir"):
            section, name = key.split(".")
            if getattr(getattr(new, section), name) != getattr(getattr(self.config, section), name):
                log.warning("%s changed: takes effect after a restart", key)
        assert self.probe is not None
        if new.bpf.live_updates and not self.probe.can_sweep:
            log.warning("bpf.live_updates turned on: takes effect after a restart")
        self.probe.want_live_updates(new.bpf.live_updates)
        self.probe.want_periodic_records(new.accesslog.periodic)
        if sinks is not None:
            self.probe.want_records(bool(sinks.sinks))
            for sink in self.sinks.sinks:  # dropped counters carry over: counters never go down
                self._dropped_before[sink.name] = (
                    self._dropped_before.get(sink.name, 0) + sink.dropped
                )
            old, self.sinks = self.sinks, sinks
            old.close()
        else:
            self.sinks.reopen()
        if source is not self.source:
            self.source.close()
            self.source = source
            source.start()
        if new.accesslog.max_rate != self.config.accesslog.max_rate:
            self.budget = TokenBucket(new.accesslog.max_rate)
        self._update_known(force=True)
        self.config = new
        log.info("reloaded %s", new.path)

    # -- shutdown ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Final publish, detach, close. Safe after a partial startup."""
        self.notify.stopping()
        if self.probe is not None:
            # Whatever is queued is written, past the budget: at most a ring buffer's worth
            # (about 40,000 records, a second or two), and nothing is left behind unwritten.
            self.budget = TokenBucket(0)
            self.probe.drain()
            self.publish()
            self.probe.close(detach=True)
            self.probe = None
        if self.http is not None:
            self.http.close()
        self.source.close()
        self.sinks.close()
        sys.stdout.flush()
