"""The apiserver source: pods, services and EndpointSlices of the whole cluster, by list
and watch (client-go's reflector, reduced to what kmeshd needs).

Per resource, one thread: list (paginated, `limit`/`continue`), then watch from the
list's resourceVersion with bookmarks, and watch again from the last version seen when
a watch ends. Only a 410 Gone (the version was compacted away) leads to a new list, so
in steady state kmeshd makes one list per resource and then watches only. Errors back
off with jitter (capped), a 429's Retry-After is honoured (within limits), and nothing
already known is dropped while the apiserver is unreachable: the cache keeps its last
good state.

The apiserver is not trusted to be sane either: a 410 on every watch relists once at
once, then after a backoff; watches refused again and again relist (after a backoff);
paging ends at a repeated continue token or MAX_PAGES; an object that is not valid is
skipped and counted (`Rejected`), never a reason to stop.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from kmeshd.backoff import Backoff
from kmeshd.identity.cache import APISERVER, PODS, SERVICES, SLICES
from kmeshd.identity.client import (
    NOT_USABLE,
    ApiError,
    Client,
    Expired,
    Refused,
    json_lines,
    printable,
)
from kmeshd.identity.objects import (
    Malformed,
    Naming,
    namespaced_key,
    parse_endpoint_slice,
    parse_pod,
    parse_service,
    pod_key,
)
from kmeshd.identity.updates import (
    Changed,
    Crashes,
    Deleted,
    Listed,
    Rejected,
    SourceState,
    Update,
)
from kmeshd.ratelimit import LOG_EVERY_S, Throttle
from kmeshd.supervise import Supervised

log = logging.getLogger("kmeshd")

PAGE_SIZE = 500
# A list ends with an error past these (1,000,000 objects), and is tried again later.
MAX_PAGES = 2000
MAX_LIST_ITEMS = 1_000_000
# Watches the apiserver refused in a row (e.g. 400 for a resourceVersion it cannot take)
# before listing again: the version they start from is what is wrong.
MAX_REFUSED_WATCHES = 5
WATCH_SECONDS = (300, 600)  # each watch asks for a random length in this range, like client-go
# Lists run one at a time: a page is megabytes of JSON and tens of megabytes once
# decoded; three at once tripled the daemon's peak memory for no faster sync (the GIL
# serialises the decoding anyway).
_ONE_LIST_AT_A_TIME = threading.Lock()
SHORT_WATCH_S = 1.0  # a watch that ended sooner than this backs off before the next one
# Once a watch has caught up with the stream, it pauses this long before reading again, so
# that what arrives meanwhile is read in one go: an identity change may wait this much
# longer (the kubelet is polled every 10 s by default), and at 20 pod events a second the
# watch costs 2.5 times less CPU (README "Kubernetes identities at scale").
WATCH_PAUSE_S = 0.5
CAUGHT_UP_S = 0.005  # a read that waited longer than this found nothing buffered


@dataclass(frozen=True)
class Resource:
    name: str
    path: str
    parse: Callable[[Any, Naming], Any]
    key: Callable[[Any], str | tuple[str, str]]  # of a deleted object; raises Malformed


RESOURCES = (
    Resource(PODS, "/api/v1/pods", parse_pod, pod_key),
    Resource(SERVICES, "/api/v1/services", parse_service, namespaced_key),
    Resource(
        SLICES,
        "/apis/discovery.k8s.io/v1/endpointslices",
        lambda obj, _naming: parse_endpoint_slice(obj),
        namespaced_key,
    ),
)


# -- the envelopes: list pages and watch events (pure) ---------------------------------------

_VERSION = re.compile(r"[\x21-\x7e]{1,128}")  # resourceVersion: opaque, but no more than this
_TOKEN = re.compile(r"[\x21-\x7e]{1,8192}")  # continue: base64 of a small JSON object
_EVENTS = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})


def _what(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def valid_version(value: Any) -> str | None:
    """A resourceVersion the next watch can send back, or None."""
    return value if isinstance(value, str) and _VERSION.fullmatch(value) else None


@dataclass(frozen=True)
class Page:
    items: list[Any]
    version: str
    token: str  # "" on the last page


def list_page(body: Any) -> Page:
    """One page of a list; ApiError when its envelope is not a Kubernetes list."""
    if not isinstance(body, dict):
        raise ApiError(f"{NOT_USABLE}: expected a list object, got {_what(body)}")
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        raise ApiError(f"{NOT_USABLE}: metadata: expected an object, got {_what(meta)}")
    version = valid_version(meta.get("resourceVersion"))
    if version is None:
        raise ApiError(f"{NOT_USABLE}: metadata.resourceVersion: missing or not a version")
    token = meta.get("continue") or ""
    if token and not (isinstance(token, str) and _TOKEN.fullmatch(token)):
        raise ApiError(f"{NOT_USABLE}: metadata.continue: not a continue token")
    items = body.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise ApiError(f"{NOT_USABLE}: items: expected a list, got {_what(items)}")
    return Page(items, version, token)


@dataclass(frozen=True)
class Event:
    kind: str  # ADDED, MODIFIED, DELETED or BOOKMARK
    obj: dict[str, Any]
    version: str | None  # None: missing or not a version (the event is rejected)


def watch_event(event: Any) -> Event:
    """One watch event; ApiError when it is not one (Expired for a 410 ERROR event)."""
    if not isinstance(event, dict):
        raise ApiError(f"{NOT_USABLE}: a watch event is a {_what(event)}, not an object")
    kind, obj = event.get("type"), event.get("object")
    if not isinstance(kind, str) or kind not in _EVENTS:
        # repr only of a str: a value nested 990 deep has no repr within the recursion limit
        shown = printable(repr(kind[:40])) if isinstance(kind, str) else f"a {_what(kind)}"
        raise Refused(f"{NOT_USABLE}: a watch event's type is {shown}")
    if kind == "ERROR":
        raise _watch_error(obj)
    if not isinstance(obj, dict):
        raise Refused(f"{NOT_USABLE}: a {kind} event's object is a {_what(obj)}")
    meta = obj.get("metadata")
    version = valid_version(meta.get("resourceVersion")) if isinstance(meta, dict) else None
    return Event(kind, obj, version)


def _watch_error(status: Any) -> ApiError:
    """An ERROR event carries a Status; code 410 means the version is gone: list again."""
    status = status if isinstance(status, dict) else {}
    code, message = status.get("code"), status.get("message")
    code = code if isinstance(code, int) and not isinstance(code, bool) else "without a code"
    message = message if isinstance(message, str) else "no message"
    if code == 410:
        return Expired(f"watch: 410 Gone ({message})")
    return Refused(f"watch: error event {code} ({message})")


def _describe(obj: Any) -> str:
    """namespace/name of an object for a log line, whatever the object holds."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return "?"
    parts = [meta.get("namespace"), meta.get("name")]
    return printable("/".join(p for p in parts if isinstance(p, str)) or "?")


# -- the watcher ----------------------------------------------------------------------------


class Watcher:
    """Keeps one resource in sync; runs in its own thread until `stop`."""

    def __init__(
        self,
        client: Client,
        resource: Resource,
        naming: Naming,
        out: queue.Queue[Update],
        stop: threading.Event,
        backoff: Backoff | None = None,
    ) -> None:
        self.client, self.resource, self.naming = client, resource, naming
        self.out, self.stop = out, stop
        self.backoff = backoff or Backoff()
        self._malformed = Throttle(LOG_EVERY_S)
        self._rejected = 0  # objects rejected and not yet reported
        self._crash = Crashes(f"apiserver {resource.name}")
        self._expired = 0  # 410s since the last watch that lasted
        self._refused = 0  # watches refused in a row (since the last that lasted)

    def run(self) -> None:
        """Until `stop`. Whatever breaks the loop (a bug, an input nothing foresaw) is
        logged, reported as the source's error, and the loop starts over, listing again,
        after a backoff: a thread that died would leave the source "up" and frozen."""
        while not self.stop.is_set():
            try:
                self.sync()
            except Exception as exc:
                self._state(self._crash.seen(exc))
                self.stop.wait(self.backoff.next())

    def sync(self) -> None:
        version: str | None = None
        while not self.stop.is_set():
            try:
                if version is None:
                    with _ONE_LIST_AT_A_TIME:
                        version = self.list_all()
                    self._state("")
                started = time.monotonic()
                version = self.watch(version)
                if time.monotonic() - started >= SHORT_WATCH_S:
                    self.backoff.reset()
                    self._expired = self._refused = 0
                else:  # watches that end at once, again and again, must not spin
                    self.stop.wait(self.backoff.next())
            except Expired as exc:
                version = None
                self._expired += 1
                if self._expired == 1:  # compaction happens: list again at once, once
                    log.info("%s: %s; listing again", self.resource.name, exc)
                else:  # a server that expires every version must not get a list loop
                    self._state(f"{exc}; again: listing again after a backoff")
                    self.stop.wait(self.backoff.next())
            except ApiError as exc:
                self._state(str(exc))
                if isinstance(exc, Refused) and version is not None:
                    self._refused += 1
                    if self._refused >= MAX_REFUSED_WATCHES:  # e.g. a bad version: list
                        log.warning(
                            "apiserver %s: %d watches refused in a row; listing again",
                            self.resource.name,
                            self._refused,
                        )
                        version, self._refused = None, 0
                delay = self.backoff.next()
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                self.stop.wait(delay)

    # -- list ---------------------------------------------------------------------------

    def list_all(self) -> str:
        """Every object, page by page; returns the list's resourceVersion. A continue
        token seen before, or more than MAX_PAGES pages or MAX_LIST_ITEMS objects, is an
        ApiError: a server must not keep kmeshd paging (and growing) forever."""
        values: list[Any] = []
        params = {"limit": str(PAGE_SIZE)}
        tokens: set[str] = set()
        received = 0
        for _ in range(MAX_PAGES):
            page = list_page(self.client.get_json(self.resource.path, params))
            received += len(page.items)
            if received > MAX_LIST_ITEMS:
                raise ApiError(
                    f"list {self.resource.name}: more than {MAX_LIST_ITEMS} objects"
                    " (the limit); listing again later"
                )
            values.extend(self._parsed(page.items))
            self._report_rejected()
            if not page.token:
                break
            if page.token in tokens:
                raise ApiError(
                    f"list {self.resource.name}: the apiserver sent a continue token"
                    " it had sent before (paging would never end); listing again later"
                )
            tokens.add(page.token)
            params = {"limit": str(PAGE_SIZE), "continue": page.token}
        else:
            raise ApiError(
                f"list {self.resource.name}: more than {MAX_PAGES} pages (the limit);"
                " listing again later"
            )
        self.out.put(Listed(APISERVER, self.resource.name, tuple(values)))
        log.info("apiserver: %d %s at version %s", len(values), self.resource.name, page.version)
        return page.version

    def _parsed(self, items: list[Any]) -> Iterator[Any]:
        for obj in items:
            value = self._parse(obj)
            if value is not None:
                yield value

    def _parse(self, obj: Any) -> Any:
        try:
            return self.resource.parse(obj, self.naming)
        except Malformed as exc:
            self._reject(obj, str(exc))
            return None

    def _reject(self, obj: Any, problem: str) -> None:
        """Skipped and counted; logged at most once a minute."""
        self._rejected += 1
        if self._malformed.ready():
            log.warning(
                "apiserver: skipping %s %s: %s (kmeshd_identity_objects_rejected_total)",
                self.resource.name,
                _describe(obj),
                printable(problem),
            )

    def _report_rejected(self) -> None:
        if self._rejected:
            self.out.put(Rejected(APISERVER, self.resource.name, self._rejected))
            self._rejected = 0

    # -- watch --------------------------------------------------------------------------

    def watch(self, version: str) -> str:
        """Events after `version` until the server ends the watch; returns the last version
        seen, from which the next watch goes on."""
        params = {
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(random.randint(*WATCH_SECONDS)),
        }
        resp = self.client.get(
            self.resource.path, params, stream=True, read_timeout=WATCH_SECONDS[1] + 30
        )
        # In sync again once an event came through whole or the watch ended cleanly: a
        # watch that connects and then breaks every time is not.
        in_sync = False
        for event in paced(json_lines(resp), self.stop.wait):
            if self.stop.is_set():
                break
            version = self._event(event, version)
            if not in_sync:
                self._state("")
                in_sync = True
        if not in_sync:
            self._state("")
        return version

    def _event(self, raw: Any, version: str) -> str:
        """One event into the cache; returns the version the next watch starts from."""
        event = watch_event(raw)
        if event.version is None:
            self._reject(event.obj, f"a {event.kind} event without a valid resourceVersion")
        elif event.kind == "DELETED":
            try:
                key = self.resource.key(event.obj)
            except Malformed as exc:
                self._reject(event.obj, str(exc))
            else:
                self.out.put(Deleted(APISERVER, self.resource.name, key))
        elif event.kind != "BOOKMARK":
            value = self._parse(event.obj)
            if value is not None:
                self.out.put(Changed(APISERVER, self.resource.name, value))
        self._report_rejected()
        return event.version or version

    def _state(self, error: str) -> None:
        self.out.put(SourceState(APISERVER, self.resource.name, error))


def paced(
    events: Generator[Any, None, None],
    wait: Callable[[float], bool],
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Any]:
    """The events as they come, with a pause of WATCH_PAUSE_S after each one whose read had
    to wait for the network. Waking a thread for one event and decrypting its few TLS
    records costs several times what parsing it does; after a pause the events that piled
    up in the socket are read together. A burst is read without pauses, as long as there
    is something buffered. `wait(seconds)` returns True to stop (threading.Event.wait)."""
    try:
        while True:
            started = clock()
            try:
                event = next(events)
            except StopIteration:
                return
            caught_up = clock() - started > CAUGHT_UP_S
            yield event
            if caught_up and wait(WATCH_PAUSE_S):
                return
    finally:
        events.close()  # closes the response


def start_watchers(
    client: Client, naming: Naming, out: queue.Queue[Update], stop: threading.Event
) -> list[Watcher]:
    """One watcher thread per resource."""
    watchers = [Watcher(client, r, naming, out, stop) for r in RESOURCES]
    for w in watchers:
        # run() survives its own failures; Supervised is the net under that net.
        Supervised(f"apiserver-{w.resource.name}", w.run, stop).start()
    return watchers
