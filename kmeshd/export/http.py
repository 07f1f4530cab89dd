"""The /metrics listener: prometheus_client's WSGI app on a threading server of ours.

Ours because Debian's prometheus-client 0.16 neither returns its server (no clean
shutdown) nor binds IPv6 literals; binding happens in `open_listener`, so "address in
use" is reported at start-up.
"""

from __future__ import annotations

import errno
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    gc_collector,
    make_wsgi_app,
    platform_collector,
    process_collector,
)
from prometheus_client.registry import Collector

from kmeshd.config import Config, parse_listen
from kmeshd.errors import ConfigError, UnavailableError


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes are not news


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves `registry` on host:port until close()."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        self._server = server_class((host, port), _QuietHandler)
        self._server.set_app(make_wsgi_app(registry))
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def scrape_registry(collector: Collector) -> CollectorRegistry:
    """What /metrics serves: kmeshd's families, and the process's own (process_*,
    python_*), which the textfile leaves to node-exporter."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    process_collector.ProcessCollector(registry=registry)
    platform_collector.PlatformCollector(registry=registry)
    gc_collector.GCCollector(registry=registry)
    return registry


def open_listener(config: Config, registry: CollectorRegistry) -> MetricsServer | None:
    """The listener `metrics.listen` asks for, bound; None when it is "". An address in use
    is UnavailableError (exit 69), any other refusal a ConfigError naming the key."""
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
