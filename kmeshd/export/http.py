"""The /metrics listener: serves the last publish's families from memory.

Each publish hands over its kmesh_* and kmeshd_* families once, gzip-compressed (a node's
label sets make tens of megabytes of text, which compress fifty-fold). A scraper that
accepts gzip (Prometheus does) gets those bytes as they are; any other gets them inflated
as they are sent. Either way the process's own families (process_*, python_*, which the
textfile leaves to node-exporter) follow, rendered at the scrape. A scrape never waits on
a publish, nor a publish on a scrape. Binding happens in `open_listener`, so "address in
use" is reported at start-up.

metrics.web_config adds TLS, client certificates and basic auth (export.webaccess). The
listening socket stays plain: each connection's TLS handshake happens in its own thread,
under the client timeout, so a client that never finishes one holds one slot for
CLIENT_TIMEOUT_S and stops no other scrape. What a connection must pass (an `Access`) is
swapped whole on reload, without closing the listener.
"""

from __future__ import annotations

import errno
import gzip
import logging
import socket
import ssl
import sys
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

from kmeshd.config import Config, parse_listen
from kmeshd.errors import ConfigError, UnavailableError
from kmeshd.export.webaccess import Access, open_access, warn_if_exposed
from kmeshd.export.webconfig import san_matches
from kmeshd.ratelimit import LOG_EVERY_S, Throttle
from kmeshd.supervise import Supervised

log = logging.getLogger("kmeshd")

CLIENT_TIMEOUT_S = 10.0  # a scrape's client silent this long is disconnected
MAX_CLIENTS = 64  # connections served at once; a Prometheus server uses one per target
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CHUNK = 1 << 20  # bytes inflated at a time for a scraper that takes no gzip
EMPTY_GZIP = gzip.compress(b"")


@dataclass(frozen=True)
class Body:
    """A publish's families: gzip-compressed, and how long they are inflated."""

    gzip: bytes = EMPTY_GZIP
    size: int = 0


def process_registry() -> CollectorRegistry:
    """The process's own families, which /metrics serves and the textfile does not."""
    registry = CollectorRegistry(auto_describe=False)
    process_collector.ProcessCollector(registry=registry)
    platform_collector.PlatformCollector(registry=registry)
    gc_collector.GCCollector(registry=registry)
    return registry


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # A client that connects and sends nothing, or stops reading, holds a thread: it is let
    # go after this long without progress (each read or write of the socket).
    timeout = CLIENT_TIMEOUT_S

    def do_GET(self) -> None:
        auth = self.server.access.auth
        if auth is not None and not auth.allows(self.headers.get("Authorization")):
            self.server.unauthorized += 1
            self._unauthorized()
            return
        body = self.server.body
        own = generate_latest(self.server.process)
        zipped = "gzip" in self.headers.get("Accept-Encoding", "")
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        if zipped:
            tail = gzip.compress(own, compresslevel=1)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body.gzip) + len(tail)))
            self.end_headers()
            self.wfile.write(body.gzip)  # gzip members back to back are one gzip stream
            self.wfile.write(tail)
            return
        self.send_header("Content-Length", str(body.size + len(own)))
        self.end_headers()
        inflate = zlib.decompressobj(wbits=31)
        data = body.gzip
        while data:
            self.wfile.write(inflate.decompress(data, CHUNK))
            data = inflate.unconsumed_tail
        self.wfile.write(own)

    def _unauthorized(self) -> None:
        text = b"Unauthorized\n"
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="kmeshd"')
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def end_headers(self) -> None:
        for name, value in self.server.access.headers:  # http_server_config.headers
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes are not news


class _Server(ThreadingHTTPServer):
    """One thread a connection, at most MAX_CLIENTS at once: past that a connection is
    closed at once and counted, so a crowd of stuck clients cannot take the process's
    threads and memory."""

    daemon_threads = True
    request_queue_size = MAX_CLIENTS  # the listen backlog: a burst of scrapes waits in it
    body = Body()
    process = CollectorRegistry()
    access = Access()

    def server_activate(self) -> None:
        super().server_activate()
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.refused = 0  # connections closed because MAX_CLIENTS were being served
        self.failed = 0  # requests that raised (a client gone mid-answer is not counted)
        self.rejected = 0  # TLS handshakes that failed, client certificates not allowed
        self.unauthorized = 0  # requests answered 401
        self._complaints = Throttle(LOG_EVERY_S)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the TLS handshake, if any, then the request."""
        access = self.access  # taken once: a reload mid-handshake mixes no two contexts
        if access.context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(_Handler.timeout)
        try:
            conn = access.context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
        except OSError:  # gone already
            self.rejected += 1
            return
        try:
            if self._handshake(conn, access):
                super().finish_request(conn, client_address)
        finally:
            self.shutdown_request(conn)  # the plain socket is detached: close this one

    def _handshake(self, conn: ssl.SSLSocket, access: Access) -> bool:
        """Whether the handshake succeeded and the client's certificate is allowed; a
        failure is the client's business (no log: anyone can make one)."""
        try:
            conn.do_handshake()
        except (OSError, ValueError):  # ssl.SSLError, a reset, a timeout
            self.rejected += 1
            return False
        if access.allowed_sans:
            cert = conn.getpeercert() or {}
            sans = cert.get("subjectAltName", ())
            if not san_matches(access.allowed_sans, sans):  # type: ignore[arg-type]
                self.rejected += 1
                return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A request that raised: logged (throttled) with its traceback, not printed."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError):
            return  # the client went away, stalled or broke its TLS: its business
        self.failed += 1
        if self._complaints.ready():
            log.error("a /metrics request from %s failed: %r", client_address, exc, exc_info=exc)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves the last Body handed to `publish` on host:port until close()."""

    def __init__(self, host: str, port: int, access: Access | None = None) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        self._server = server_class((host, port), _Handler)
        self._server.process = process_registry()
        self._server.access = access or Access()
        self.port = self._server.server_port
        self.address = str(self._server.server_address[0])
        self._stop = threading.Event()
        self._thread = Supervised("metrics-http", self._serve, self._stop).start()

    def _serve(self) -> None:
        self._server.serve_forever(poll_interval=0.5)

    @property
    def restarts(self) -> int:
        """How often the listener's thread failed and was started again."""
        return self._thread.restarts

    @property
    def refused(self) -> int:
        return self._server.refused

    @property
    def access(self) -> Access:
        return self._server.access

    def use(self, access: Access) -> None:
        """Let connections in as `access` says from now on (reload); those in progress
        finish under the one they started with."""
        self._server.access = access

    def publish(self, body: Body) -> None:
        """Serve `body` from now on (scrapes in progress finish with the one they had)."""
        self._server.body = body

    def close(self) -> None:
        self._stop.set()  # before shutdown(): the thread must not serve again
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def open_listener(config: Config) -> MetricsServer | None:
    """The listener `metrics.listen` asks for, bound, with the TLS and auth of
    metrics.web_config; None when it is "". An address in use is UnavailableError (exit 69),
    any other refusal (a bad web config included) a ConfigError naming the key."""
    if not config.metrics.listen:
        return None
    host, port = parse_listen(config.metrics.listen)
    access = open_access(config)
    try:
        server = MetricsServer(host, port, access)
        warn_if_exposed(server.address, access, config.metrics.listen)
        return server
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
