"""The apiserver source: pods, services and EndpointSlices of the whole cluster, by list
and watch (client-go's reflector, reduced to what kmeshd needs).

Per resource, one thread: list (paginated, `limit`/`continue`), then watch from the
list's resourceVersion with bookmarks, and watch again from the last version seen when
a watch ends. Only a 410 Gone (the version was compacted away) leads to a new list, so
in steady state kmeshd makes one list per resource and then watches only. Errors back
off with jitter (capped), a 429's Retry-After is honoured, and nothing already known is
dropped while the apiserver is unreachable: the cache keeps its last good state.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kmeshd.backoff import Backoff
from kmeshd.identity.cache import APISERVER, PODS, SERVICES, SLICES
from kmeshd.identity.client import ApiError, Client, Expired, json_lines
from kmeshd.identity.objects import (
    Malformed,
    Naming,
    parse_endpoint_slice,
    parse_pod,
    parse_service,
)
from kmeshd.identity.updates import Changed, Deleted, Listed, SourceState, Update
from kmeshd.ratelimit import LOG_EVERY_S, Throttle

log = logging.getLogger("kmeshd")

PAGE_SIZE = 500
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
    key: Callable[[Mapping[str, Any]], str | tuple[str, str]]


def _uid(obj: Mapping[str, Any]) -> str:
    return str(obj.get("metadata", {}).get("uid", ""))


def _namespaced_name(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata", {})
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


RESOURCES = (
    Resource(PODS, "/api/v1/pods", parse_pod, _uid),
    Resource(SERVICES, "/api/v1/services", parse_service, _namespaced_name),
    Resource(
        SLICES,
        "/apis/discovery.k8s.io/v1/endpointslices",
        lambda obj, _naming: parse_endpoint_slice(obj),
        _namespaced_name,
    ),
)


def _resource_version(obj: Any) -> str:
    rv = obj.get("metadata", {}).get("resourceVersion") if isinstance(obj, Mapping) else None
    if not isinstance(rv, str) or not rv:
        raise ApiError("the response has no metadata.resourceVersion")
    return rv


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

    def run(self) -> None:
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
                else:  # watches that end at once, again and again, must not spin
                    self.stop.wait(self.backoff.next())
            except Expired as exc:
                log.info("%s: %s; listing again", self.resource.name, exc)
                version = None
            except ApiError as exc:
                self._state(str(exc))
                delay = exc.retry_after if exc.retry_after is not None else self.backoff.next()
                self.stop.wait(delay)

    # -- list ---------------------------------------------------------------------------

    def list_all(self) -> str:
        """Every object, page by page; returns the list's resourceVersion."""
        values: list[Any] = []
        params = {"limit": str(PAGE_SIZE)}
        while True:
            body = self.client.get_json(self.resource.path, params)
            items = body.get("items") if isinstance(body, Mapping) else None
            version = _resource_version(body)
            values.extend(self._parsed(items if isinstance(items, list) else []))
            token = body.get("metadata", {}).get("continue")
            if not token:
                break
            params = {"limit": str(PAGE_SIZE), "continue": str(token)}
        self.out.put(Listed(APISERVER, self.resource.name, tuple(values)))
        log.info("apiserver: %d %s at version %s", len(values), self.resource.name, version)
        return version

    def _parsed(self, items: list[Any]) -> Iterator[Any]:
        for obj in items:
            value = self._parse(obj)
            if value is not None:
                yield value

    def _parse(self, obj: Any) -> Any:
        try:
            return self.resource.parse(obj, self.naming)
        except Malformed as exc:
            if self._malformed.ready():
                name = _namespaced_name(obj) if isinstance(obj, Mapping) else "?"
                log.warning("apiserver: skipping %s %s: %s", self.resource.name, name, exc)
            return None

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

    def _event(self, event: Any, version: str) -> str:
        kind = event.get("type") if isinstance(event, Mapping) else None
        obj = event.get("object") if isinstance(event, Mapping) else None
        if kind == "ERROR":
            raise _watch_error(obj)
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK") or not isinstance(obj, Mapping):
            raise ApiError(f"watch {self.resource.name}: unexpected event {str(event)[:200]}")
        if kind == "DELETED":
            self.out.put(Deleted(APISERVER, self.resource.name, self.resource.key(obj)))
        elif kind != "BOOKMARK":
            value = self._parse(obj)
            if value is not None:
                self.out.put(Changed(APISERVER, self.resource.name, value))
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        return rv if isinstance(rv, str) and rv else version

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


def _watch_error(status: Any) -> ApiError:
    """An ERROR event carries a Status; code 410 means the version is gone: list again."""
    code = status.get("code") if isinstance(status, Mapping) else None
    message = status.get("message", "") if isinstance(status, Mapping) else str(status)
    if code == 410:
        return Expired(f"watch: 410 Gone ({message})")
    return ApiError(f"watch: error event {code} ({message})")


def start_watchers(
    client: Client, naming: Naming, out: queue.Queue[Update], stop: threading.Event
) -> list[Watcher]:
    """One watcher thread per resource."""
    watchers = [Watcher(client, r, naming, out, stop) for r in RESOURCES]
    for w in watchers:
        threading.Thread(target=w.run, name=f"apiserver-{w.resource.name}", daemon=True).start()
    return watchers
