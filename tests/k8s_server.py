"""A test Kubernetes apiserver and kubelet that speak the real HTTP protocol.

``Cluster`` is an object store for pods, services and EndpointSlices with etcd's versioning: one
global resourceVersion (an integer, sent as a string) that every put and delete bumps. Each
change is kept as a watch event until ``compact()`` forgets the history, as etcd compaction does.

``ApiServer`` serves a ``Cluster`` over HTTPS on an ephemeral port of 127.0.0.1, on the real
cluster-wide collection paths (``/api/v1/pods``, ``/api/v1/services``,
``/apis/discovery.k8s.io/v1/endpointslices``), with these semantics of a real apiserver:

- Authentication: ``Authorization: Bearer <token>`` equal to the current ``token`` (which a test
  may change at any time, to simulate rotation or expiry), or a client certificate signed by the
  CA. Otherwise 401 with a ``Status`` body. A client certificate from another CA fails the TLS
  handshake, as Go's ``VerifyClientCertIfGiven`` does.
- List: items sorted by (namespace, name); without ``limit`` everything in one response. With
  ``limit``, ``metadata.continue`` and ``remainingItemCount`` while more remain, and every page
  comes from the snapshot taken at the first page (its resourceVersion is the list's), like
  etcd's MVCC read at a revision. A continue token from before a ``compact()`` gets 410
  ``Expired``. List items carry no ``kind``/``apiVersion`` (the apiserver omits them in JSON).
  A list's ``resourceVersion`` parameter is ignored: the latest state satisfies the default
  "not older than" match. ``labelSelector``/``fieldSelector`` are refused with 400.
- Watch (``watch=1``/``true``): a chunked ``application/json`` stream, one
  ``{"type":...,"object":...}`` per line. From ``resourceVersion=N`` it sends the events after N,
  then live ones; from ``""``/``"0"`` a synthetic ADDED per current object first. Bookmarks go
  only to watches with ``allowWatchBookmarks=true``. A resourceVersion older than the compacted
  history gets HTTP 200 and a single ``ERROR`` event holding a 410 ``Expired`` Status.
  The stream ends after ``timeoutSeconds`` (capped by ``max_watch_seconds``).

``FakeKubelet`` serves ``GET /pods`` (a PodList of one node's pods, or a fixed raw body) over
HTTPS with the same authentication, or over plain HTTP with none, like the read-only port 10255.

Both servers log every request and take injectable faults: an error status, a body that is not
JSON, a truncated body or watch line, watches cut short, a stop that refuses connections and a
start on the same port, and a server certificate from the wrong CA. Faults are consumed only by
requests that pass authentication (a 401 never uses one up).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import functools
import importlib
import json
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from tests.tls import TlsFiles

# Real captured payloads (kubelet and apiserver bodies, a kubeconfig), each with its origin
# in tests/data/k8s/PROVENANCE.md.
TESTDATA = Path(__file__).resolve().parent / "data" / "k8s"

# Imported by name: Debian's python3-yaml ships no type stubs, and types-PyYAML is not a
# dependency; an ignore comment would turn into an "unused ignore" error where it is installed.
yaml: Any = importlib.import_module("yaml")

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    name: str
    path: str
    kind: str
    api_version: str


RESOURCES = {
    r.name: r
    for r in (
        Resource("pods", "/api/v1/pods", "Pod", "v1"),
        Resource("services", "/api/v1/services", "Service", "v1"),
        Resource(
            "endpointslices",
            "/apis/discovery.k8s.io/v1/endpointslices",
            "EndpointSlice",
            "discovery.k8s.io/v1",
        ),
    )
}
_BY_PATH = {r.path: r for r in RESOURCES.values()}
_BY_KIND = {r.kind: r for r in RESOURCES.values()}

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    410: "Expired",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter."
)
GARBAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"  # e.g. from a proxy
_MAX_SNAPSHOTS = 32  # paginated lists in flight per resource; older continue tokens get 410


def status_body(code: int, message: str | None = None, reason: str | None = None) -> bytes:
    """A ``kind: Status`` failure body, with the field order the apiserver uses."""
    reason = reason or _REASONS.get(code, "Unknown")
    return json.dumps(_status(code, message or reason, reason), separators=(",", ":")).encode()


def _status(code: int, message: str, reason: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _dumps(obj: Any) -> bytes:
    # default=str: YAML captures can hold timestamps that safe_load turns into datetimes.
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


# --- loading captured payloads ---------------------------------------------------------------


def load_items(path: Path | str) -> list[Obj]:
    """The objects in a captured file: a ``*List`` JSON body, ``kind: List`` YAML, or a
    ``*.replay.json`` (items of its list bodies and objects of its watch events, in order).

    Items of a typed list (PodList...) get the ``kind`` and ``apiVersion`` the list implies;
    entries that are not objects (the kubelet's ``items: [null, ...]``) are skipped."""
    path = Path(path)
    text = path.read_text()
    if path.name.endswith(".replay.json"):
        return [o for r in json.loads(text) for o in _body_items(r["response_body"])]
    doc = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    return _list_items(doc)


def _list_items(doc: Any) -> list[Obj]:
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        return []
    kind = str(doc.get("kind", ""))
    implied = {"kind": kind.removesuffix("List"), "apiVersion": doc.get("apiVersion")}
    items = [i for i in doc["items"] if isinstance(i, dict)]
    if kind.endswith("List") and kind != "List":
        items = [{**implied, **i} for i in items]
    return items


def _body_items(body: str) -> list[Obj]:
    try:
        return _list_items(json.loads(body))
    except json.JSONDecodeError:  # a watch stream: one event per line
        events = [json.loads(line) for line in body.splitlines() if line.strip()]
        return [e["object"] for e in events if e.get("type") in ("ADDED", "MODIFIED")]


def load_into(cluster: Cluster, path: Path | str) -> int:
    """Put every pod, service and EndpointSlice of a captured file; returns how many."""
    count = 0
    for obj in load_items(path):
        resource = _BY_KIND.get(obj.get("kind", ""))
        if resource is not None:
            cluster.put(resource.name, obj)
            count += 1
    return count


# --- the object store ------------------------------------------------------------------------


class _Stored(NamedTuple):
    node: str | None  # spec.nodeName, so the kubelet can filter without parsing
    data: bytes  # the JSON of a list item: no kind/apiVersion


class _Watch:
    def __init__(self, bookmarks: bool) -> None:
        self.bookmarks = bookmarks
        self.lines: queue.SimpleQueue[bytes] = queue.SimpleQueue()


class _Table:
    """One resource's objects, sorted-list cache, event history, list snapshots and watches."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.objects: dict[tuple[str, str], _Stored] = {}
        self._sorted: list[bytes] | None = None
        self.history_rvs: list[int] = []
        self.history: list[bytes] = []  # event lines, ready to send
        self.snapshots: dict[int, list[bytes]] = {}
        self.watches: set[_Watch] = set()
        self._prefix = b'{"kind":"%s","apiVersion":"%s",' % (
            resource.kind.encode(),
            resource.api_version.encode(),
        )

    def items(self) -> list[bytes]:
        # Never mutated once built, so a list snapshot can share it.
        if self._sorted is None:
            self._sorted = [self.objects[k].data for k in sorted(self.objects)]
        return self._sorted

    def changed(self) -> None:
        self._sorted = None

    def event(self, kind: str, data: bytes) -> bytes:
        # Watch objects, unlike list items, carry kind and apiVersion.
        return b'{"type":"%s","object":%s%s}\n' % (kind.encode(), self._prefix, data[1:])

    def keep_snapshot(self, rv: int, items: list[bytes]) -> None:
        self.snapshots[rv] = items
        while len(self.snapshots) > _MAX_SNAPSHOTS:
            del self.snapshots[next(iter(self.snapshots))]


def _encode(obj: Obj, rv: int) -> tuple[tuple[str, str], _Stored]:
    item = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
    meta = dict(item.get("metadata") or {})
    meta["resourceVersion"] = str(rv)
    item["metadata"] = meta
    key = (str(meta.get("namespace", "")), str(meta["name"]))
    return key, _Stored((item.get("spec") or {}).get("nodeName"), _dumps(item))


class Cluster:
    """Thread-safe store of pods, services and EndpointSlices, versioned like etcd."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rv = 0
        self._oldest = 0  # history before this RV is compacted away
        self._tables = {name: _Table(r) for name, r in RESOURCES.items()}

    @property
    def resource_version(self) -> int:
        return self._rv

    def get(self, resource: str, namespace: str, name: str) -> Obj | None:
        """The stored object (without kind/apiVersion), or None."""
        stored = self._tables[resource].objects.get((namespace, name))
        return None if stored is None else dict(json.loads(stored.data))

    def put(self, resource: str, obj: Obj) -> int:
        """Create (ADDED) or replace (MODIFIED) by namespace/name; returns the new RV."""
        table = self._tables[resource]
        with self._lock:
            self._rv += 1
            key, stored = _encode(obj, self._rv)
            kind = "MODIFIED" if key in table.objects else "ADDED"
            table.objects[key] = stored
            self._record(table, kind, stored.data)
            return self._rv

    def delete(self, resource: str, namespace: str, name: str) -> int:
        """Remove; the DELETED event carries the last state with the new RV. KeyError if absent."""
        table = self._tables[resource]
        with self._lock:
            old = table.objects.pop((namespace, name))
            self._rv += 1
            _, stored = _encode(json.loads(old.data), self._rv)
            self._record(table, "DELETED", stored.data)
            return self._rv

    def _record(self, table: _Table, kind: str, data: bytes) -> None:
        table.changed()
        line = table.event(kind, data)
        table.history_rvs.append(self._rv)
        table.history.append(line)
        for watch in table.watches:
            watch.lines.put(line)

    def compact(self) -> None:
        """Forget history: watches and continue tokens from an RV before now get 410."""
        with self._lock:
            self._compact_locked()

    def _compact_locked(self) -> None:
        self._oldest = self._rv
        for table in self._tables.values():
            table.history_rvs.clear()
            table.history.clear()
            table.snapshots = {rv: s for rv, s in table.snapshots.items() if rv >= self._rv}

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current RV to every open watch that allows bookmarks."""
        with self._lock:
            for table in self._tables.values():
                line = table.event("BOOKMARK", b'{"metadata":{"resourceVersion":"%d"}}' % self._rv)
                for watch in table.watches:
                    if watch.bookmarks:
                        watch.lines.put(line)

    def load(self, resource: str, objects: Iterable[Obj]) -> int:
        """Bulk create without events, for scale tests. Each object gets its own RV, as if
        created one by one; then the history is compacted, so a watch from before the load gets
        410 rather than silently missing the objects. Returns the new RV."""
        table = self._tables[resource]
        with self._lock:
            for obj in objects:
                self._rv += 1
                key, stored = _encode(obj, self._rv)
                table.objects[key] = stored
            table.changed()
            self._compact_locked()
            return self._rv

    def load_synthetic(self, pods: int, services: int, nodes: int) -> int:
        """Bulk-load a synthetic cluster (see ``_Synthetic``) the way ``load`` does; it is
        about 10x faster than ``load`` with dicts. Returns the new RV."""
        synthetic = _Synthetic(pods, services, nodes)
        parts = [
            ("pods", synthetic.pod, pods),
            ("services", synthetic.service, services),
            ("endpointslices", synthetic.endpointslice, services),
        ]
        with self._lock:
            for resource, make, count in parts:
                objects = self._tables[resource].objects
                for n in range(count):
                    self._rv += 1
                    key, node, data = make(n, self._rv)
                    objects[key] = _Stored(node, data)
                self._tables[resource].changed()
            self._compact_locked()
            return self._rv

    # -- what the servers read --

    def list_page(self, resource: str, limit: int | None, token: str | None) -> tuple[int, bytes]:
        """(HTTP status, body) of one list request."""
        table = self._tables[resource]
        with self._lock:
            if token:
                start_rv = _decode_continue(token)
                if start_rv is None:
                    return 400, status_body(400, "continue key is not valid")
                rv, start = start_rv
                items = table.snapshots.get(rv) if rv >= self._oldest else None
                if items is None:
                    return 410, status_body(410, CONTINUE_EXPIRED)
            else:
                rv, start, items = self._rv, 0, table.items()
                if limit and limit < len(items):
                    table.keep_snapshot(rv, items)
        return 200, _list_body(table.resource, rv, items, start, limit)

    def open_watch(self, resource: str, rv: int | None, bookmarks: bool) -> _Watch | bytes:
        """A registered watch with its backlog queued, or the ERROR line if ``rv`` is too old.
        ``rv`` None means "from now, with an ADDED per current object"."""
        table = self._tables[resource]
        with self._lock:
            if rv is not None and rv < self._oldest:
                return _too_old(rv, self._oldest)
            if rv is None:
                backlog = [table.event("ADDED", data) for data in table.items()]
            else:
                backlog = table.history[bisect.bisect_right(table.history_rvs, rv) :]
            watch = _Watch(bookmarks)
            for line in backlog:
                watch.lines.put(line)
            table.watches.add(watch)
            return watch

    def close_watch(self, resource: str, watch: _Watch) -> None:
        with self._lock:
            self._tables[resource].watches.discard(watch)

    def node_pods(self, node: str) -> list[bytes]:
        """Pods with ``spec.nodeName == node``, as list items."""
        with self._lock:
            pods = self._tables["pods"].objects
            return [pods[k].data for k in sorted(pods) if pods[k].node == node]


def _too_old(rv: int, oldest: int) -> bytes:
    status = _status(410, f"too old resource version: {rv} ({oldest})", "Expired")
    return _dumps({"type": "ERROR", "object": status}) + b"\n"


def _list_body(
    resource: Resource, rv: int, items: list[bytes], start: int, limit: int | None
) -> bytes:
    end = len(items) if not limit else min(start + limit, len(items))
    meta: Obj = {"resourceVersion": str(rv)}
    if end < len(items):
        meta["continue"] = _encode_continue(rv, end)
        meta["remainingItemCount"] = len(items) - end
    head = {"kind": resource.kind + "List", "apiVersion": resource.api_version, "metadata": meta}
    return _dumps(head)[:-1] + b',"items":[' + b",".join(items[start:end]) + b"]}"


def _encode_continue(rv: int, start: int) -> str:
    # Opaque to clients, like the apiserver's base64 JSON token.
    raw = _dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start})
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[int, int] | None:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(raw["rv"]), int(raw["start"])
    except (binascii.Error, ValueError, TypeError, KeyError):
        return None


# --- synthetic clusters for scale tests ------------------------------------------------------
# Pod i runs on node ``node-{i % nodes}`` and backs service ``s = i % services``; service s is
# ``svc-{s}`` in namespace ``ns-{s % 50}`` and has one EndpointSlice listing its pods. The JSON
# is formatted straight from templates: building and dumping dicts is 5x slower at this scale.

_POD = (
    '{"metadata":{"name":"svc-%(s)d-%(i)d","namespace":"ns-%(ns)d",'
    '"uid":"00000000-0000-4000-8000-%(i)012d","resourceVersion":"%(rv)d",'
    '"labels":{"app":"svc-%(s)d"},"ownerReferences":[{"apiVersion":"apps/v1",'
    '"kind":"ReplicaSet","name":"svc-%(s)d-rs","uid":"00000000-0000-4000-9000-%(s)012d",'
    '"controller":true}]},"spec":{"nodeName":"node-%(node)d","serviceAccountName":"default",'
    '"containers":[{"name":"app","image":"registry.example/app:1"}]},'
    '"status":{"phase":"Running","podIP":"%(ip)s","podIPs":[{"ip":"%(ip)s"}]}}'
)
_SERVICE = (
    '{"metadata":{"name":"svc-%(s)d","namespace":"ns-%(ns)d","resourceVersion":"%(rv)d"},'
    '"spec":{"type":"ClusterIP","clusterIP":"%(ip)s","clusterIPs":["%(ip)s"],'
    '"selector":{"app":"svc-%(s)d"},'
    '"ports":[{"name":"http","port":80,"protocol":"TCP","targetPort":8080}]}}'
)
_SLICE = (
    '{"metadata":{"name":"svc-%(s)d-x7k2p","namespace":"ns-%(ns)d","resourceVersion":"%(rv)d",'
    '"labels":{"kubernetes.io/service-name":"svc-%(s)d"}},"addressType":"IPv4",'
    '"endpoints":[%(endpoints)s],"ports":[{"name":"http","port":8080,"protocol":"TCP"}]}'
)
_ENDPOINT = (
    '{"addresses":["%(ip)s"],"conditions":{"ready":true,"serving":true,"terminating":false},'
    '"nodeName":"node-%(node)d","targetRef":{"kind":"Pod","namespace":"ns-%(ns)d",'
    '"name":"svc-%(s)d-%(i)d","uid":"00000000-0000-4000-8000-%(i)012d"}}'
)


def synthetic_pod_ip(i: int) -> str:
    """The IP of synthetic pod i: 10.0.0.1 onwards."""
    return _ip((10 << 24) + 1 + i)


def synthetic_service_ip(s: int) -> str:
    """The ClusterIP of synthetic service s: 10.96.0.1 onwards."""
    return _ip((10 << 24) + (96 << 16) + 1 + s)


def _ip(n: int) -> str:
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


class _Synthetic:
    """Formats the objects of one synthetic cluster as (key, node, JSON) for ``Cluster``."""

    def __init__(self, pods: int, services: int, nodes: int) -> None:
        self.pods, self.services, self.nodes = pods, services, nodes

    def _pod_fields(self, i: int) -> dict[str, Any]:
        s = i % self.services
        return {"i": i, "s": s, "ns": s % 50, "node": i % self.nodes, "ip": synthetic_pod_ip(i)}

    def pod(self, i: int, rv: int) -> tuple[tuple[str, str], str, bytes]:
        f = self._pod_fields(i)
        key = (f"ns-{f['ns']}", f"svc-{f['s']}-{i}")
        return key, f"node-{f['node']}", (_POD % {**f, "rv": rv}).encode()

    def service(self, s: int, rv: int) -> tuple[tuple[str, str], None, bytes]:
        f = {"s": s, "ns": s % 50, "rv": rv, "ip": synthetic_service_ip(s)}
        return (f"ns-{s % 50}", f"svc-{s}"), None, (_SERVICE % f).encode()

    def endpointslice(self, s: int, rv: int) -> tuple[tuple[str, str], None, bytes]:
        pods = range(s, self.pods, self.services)
        endpoints = ",".join(_ENDPOINT % self._pod_fields(i) for i in pods)
        f = {"s": s, "ns": s % 50, "rv": rv, "endpoints": endpoints}
        return (f"ns-{s % 50}", f"svc-{s}-x7k2p"), None, (_SLICE % f).encode()


# --- HTTP machinery shared by both servers ---------------------------------------------------


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    status: int


@dataclass
class _Fault:
    prefix: str
    watch: bool | None  # None: both lists and watches
    action: str  # "status", "garbage" or "truncate"
    status: int
    body: bytes
    headers: dict[str, str]
    remaining: int

    def matches(self, path: str, watch: bool) -> bool:
        wanted = self.watch is None or self.watch == watch
        return self.remaining > 0 and wanted and path.startswith(self.prefix)


def _parse(target: str) -> tuple[str, dict[str, str]]:
    url = urlsplit(target)
    return url.path, dict(parse_qsl(url.query, keep_blank_values=True))


def _is_watch(query: dict[str, str]) -> bool:
    return query.get("watch") in ("1", "true")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams
    timeout = 30  # idle keep-alive connections close after this
    server: _HTTPServer

    def setup(self) -> None:
        # The handshake runs here, in the connection's thread, not in the accept loop.
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()
        self.server.owner._track(self.request, True)

    def finish(self) -> None:
        self.server.owner._track(self.request, False)
        super().finish()

    def do_GET(self) -> None:
        self.server.owner._dispatch(self)

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        path, query = _parse(self.path)
        self.server.owner._log(Request(self.command, path, query, code))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read the request log instead


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # start() again on the same port

    def __init__(self, owner: _FakeServer, port: int) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        context = self.owner._context
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # failed handshakes and clients that hang up are what the tests provoke


def _server_context(tls: TlsFiles, wrong_ca: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if wrong_ca:
        context.load_cert_chain(tls.wrong_server_cert, tls.wrong_server_key)
    else:
        context.load_cert_chain(tls.server_cert, tls.server_key)
    context.load_verify_locations(tls.ca_cert)
    context.verify_mode = ssl.CERT_OPTIONAL  # client certificates are one way to authenticate
    return context


def _send(
    h: _Handler,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    cut: bool = False,
) -> None:
    """A whole response; ``cut`` sends half the body under the full Content-Length, then drops
    the connection."""
    h.send_response(status)
    for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
        h.send_header(name, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body[: len(body) // 2] if cut else body)
    if cut:
        _drop(h)


def _drop(h: _Handler) -> None:
    """Close the TCP connection without a TLS close_notify or the end of a chunked body."""
    h.close_connection = True
    h.request.shutdown(socket.SHUT_RDWR)


class _FakeServer:
    """Start/stop on a fixed port, TLS, authentication, faults and the request log."""

    def __init__(self, tls: TlsFiles | None, token: str | None, port: int, wrong_ca: bool) -> None:
        self.tls = tls
        self.token = token  # change it at any time to simulate rotation or expiry
        self.port = port
        self._context = None if tls is None else _server_context(tls, wrong_ca)
        self._lock = threading.Lock()
        self._log_entries: list[Request] = []
        self._faults: list[_Fault] = []
        self._connections: set[socket.socket] = set()
        self._server: _HTTPServer | None = None
        self._epoch = 0  # bumped by stop(), so streams of the old server end

    @property
    def url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again): the first start picks a free port, later ones reuse it."""
        self._server = _HTTPServer(self, self.port)
        self.port = self._server.server_address[1]
        # A short poll interval: stop() waits up to one interval for the accept loop to end.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.05)
        threading.Thread(target=serve, daemon=True).start()

    def stop(self) -> None:
        """Close the listening socket (connections are refused) and every open connection."""
        if self._server is None:
            return
        self._epoch += 1
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):  # already gone
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _FakeServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _track(self, sock: socket.socket, open_: bool) -> None:
        # Open connections, so that stop() can cut them as an apiserver restart would.
        with self._lock:
            if open_:
                self._connections.add(sock)
            else:
                self._connections.discard(sock)

    def use_wrong_ca(self, wrong: bool = True) -> None:
        """New connections get a server certificate signed by the unrelated CA (or the right one
        again). Connections already open keep theirs."""
        assert self.tls is not None, "plain HTTP has no certificate"
        self._context = _server_context(self.tls, wrong)

    # -- the request log --

    @property
    def log(self) -> list[Request]:
        with self._lock:
            return list(self._log_entries)

    def clear_log(self) -> None:
        with self._lock:
            self._log_entries.clear()

    def _log(self, request: Request) -> None:
        with self._lock:
            self._log_entries.append(request)

    # -- faults: each applies to the next ``times`` authenticated GETs whose path starts with
    # ``path_prefix`` (and that are, or are not, watches, when ``watch`` is given) --

    def fail(
        self,
        path_prefix: str,
        status: int,
        body: bytes | Obj | None = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
        watch: bool | None = None,
    ) -> None:
        """Answer ``status`` with ``body`` (default: a Status for that code) and ``headers``,
        e.g. ``fail(path, 429, headers={"Retry-After": "2"})``."""
        raw = _dumps(body) if isinstance(body, dict) else body
        raw = status_body(status) if raw is None else raw
        self._add(_Fault(path_prefix, watch, "status", status, raw, headers or {}, times))

    def garbage(self, path_prefix: str, times: int = 1, watch: bool | None = None) -> None:
        """Answer 200 with a body that is not JSON (``GARBAGE``)."""
        self._add(_Fault(path_prefix, watch, "garbage", 200, GARBAGE, {}, times))

    def truncate(self, path_prefix: str, times: int = 1, watch: bool | None = None) -> None:
        """Send half the body under the full Content-Length, or for a watch half of its first
        event line, then close the connection."""
        self._add(_Fault(path_prefix, watch, "truncate", 200, b"", {}, times))

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, path: str, watch: bool) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(path, watch):
                    fault.remaining -= 1
                    return fault
        return None

    # -- serving --

    def _authorized(self, h: _Handler) -> bool:
        if self.tls is None:
            return True  # the kubelet's read-only port has no authentication
        if isinstance(h.request, ssl.SSLSocket) and h.request.getpeercert():
            return True  # verified against the CA during the handshake
        return self.token is not None and h.headers.get("Authorization") == f"Bearer {self.token}"

    def _dispatch(self, h: _Handler) -> None:
        path, query = _parse(h.path)
        if not self._authorized(h):
            self._unauthorized(h)
            return
        fault = self._take_fault(path, _is_watch(query))
        if fault is not None and fault.action != "truncate":
            _send(h, fault.status, fault.body, fault.headers)
            return
        self._route(h, path, query, cut=fault is not None)

    def _unauthorized(self, h: _Handler) -> None:
        _send(h, 401, status_body(401))

    def _route(self, h: _Handler, path: str, query: dict[str, str], cut: bool) -> None:
        raise NotImplementedError


class ApiServer(_FakeServer):
    """The apiserver for a ``Cluster``: list and watch on the three collection paths."""

    def __init__(
        self,
        cluster: Cluster,
        tls: TlsFiles,
        token: str | None = "test-token",
        port: int = 0,
        wrong_ca: bool = False,
        max_watch_seconds: float = 60.0,
    ) -> None:
        super().__init__(tls, token, port, wrong_ca)
        self.cluster = cluster
        self.max_watch_seconds = max_watch_seconds
        self._watch_lifetime: float | None = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def watch_lifetime(self, seconds: float | None) -> None:
        """Close every watch (cleanly) once it is ``seconds`` old, open ones included;
        None lifts the limit."""
        self._watch_lifetime = seconds

    def _route(self, h: _Handler, path: str, query: dict[str, str], cut: bool) -> None:
        resource = _BY_PATH.get(path)
        if resource is None:
            _send(h, 404, status_body(404, "the server could not find the requested resource"))
        elif "labelSelector" in query or "fieldSelector" in query:
            _send(h, 400, status_body(400, "the test apiserver does not implement selectors"))
        elif _is_watch(query):
            self._watch(h, resource, query, cut)
        else:
            self._list(h, resource, query, cut)

    def _list(self, h: _Handler, resource: Resource, query: dict[str, str], cut: bool) -> None:
        try:
            limit = int(query.get("limit") or 0) or None
        except ValueError:
            _send(h, 400, status_body(400, "limit must be an integer"))
            return
        status, body = self.cluster.list_page(resource.name, limit, query.get("continue"))
        _send(h, status, body, cut=cut and status == 200)

    def _watch(self, h: _Handler, resource: Resource, query: dict[str, str], cut: bool) -> None:
        try:
            rv_text = query.get("resourceVersion", "")
            rv = None if rv_text in ("", "0") else int(rv_text)
            timeout = float(query.get("timeoutSeconds") or self.max_watch_seconds)
        except ValueError:
            _send(h, 400, status_body(400, "resourceVersion and timeoutSeconds must be numbers"))
            return
        bookmarks = query.get("allowWatchBookmarks") == "true"
        opened = self.cluster.open_watch(resource.name, rv, bookmarks)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        if isinstance(opened, bytes):  # too old: a real apiserver says so inside the stream
            _chunk(h, opened)
            _chunk(h, b"")
            return
        try:
            self._stream(h, opened, min(timeout, self.max_watch_seconds), cut)
        finally:
            self.cluster.close_watch(resource.name, opened)

    def _stream(self, h: _Handler, watch: _Watch, timeout: float, cut: bool) -> None:
        started, epoch = time.monotonic(), self._epoch
        while epoch == self._epoch:
            lifetime = self._watch_lifetime
            limit = timeout if lifetime is None else min(timeout, lifetime)
            left = started + limit - time.monotonic()
            if left <= 0:
                _chunk(h, b"")  # the end of a chunked body: a clean close
                return
            try:
                line = watch.lines.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            if cut:
                _chunk(h, line[: len(line) // 2])
                _drop(h)
                return
            _chunk(h, line)


def _chunk(h: _Handler, data: bytes) -> None:
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


class FakeKubelet(_FakeServer):
    """The kubelet's ``GET /pods``: HTTPS with authentication when ``tls`` is given, else plain
    HTTP without (the read-only port). Serves ``body`` byte for byte when set, else the pods of
    ``cluster`` whose ``spec.nodeName`` is ``node_name``."""

    def __init__(
        self,
        node_name: str = "node-0",
        cluster: Cluster | None = None,
        body: bytes | None = None,
        tls: TlsFiles | None = None,
        token: str | None = "test-token",
        port: int = 0,
        wrong_ca: bool = False,
    ) -> None:
        super().__init__(tls, token, port, wrong_ca)
        self.node_name = node_name
        self.cluster = cluster
        self.body = body  # settable at any time

    def __enter__(self) -> FakeKubelet:
        self.start()
        return self

    def pod_list(self) -> bytes:
        if self.body is not None:
            return self.body
        items = [] if self.cluster is None else self.cluster.node_pods(self.node_name)
        head = b'{"kind":"PodList","apiVersion":"v1","metadata":{},"items":['
        return head + b",".join(items) + b"]}"

    def _unauthorized(self, h: _Handler) -> None:
        _send_text(h, 401, b"Unauthorized")  # the kubelet answers in plain text

    def _route(self, h: _Handler, path: str, query: dict[str, str], cut: bool) -> None:
        if path in ("/pods", "/pods/"):
            _send(h, 200, self.pod_list(), cut=cut)
        else:
            _send_text(h, 404, b"404 page not found\n")


def _send_text(h: _Handler, status: int, body: bytes) -> None:
    _send(h, status, body, {"Content-Type": "text/plain; charset=utf-8"})


def write_kubeconfig(path: Path, server: str, tls: TlsFiles, token: str = "test-token") -> Path:
    """A kubeconfig, as kubectl writes one, for `server` with a bearer token."""
    path.write_text(
        f"""apiVersion: v1
kind: Config
current-context: test
clusters:
- name: test
  cluster:
    server: {server}
    certificate-authority: {tls.ca_cert}
contexts:
- name: test
  context: {{cluster: test, user: kmeshd}}
users:
- name: kmeshd
  user:
    token: {token}
"""
    )
    return path
