"""The kubelet source: this node's pods from the kubelet's `GET /pods`, every interval.

The kubelet answers for its own pods even while the apiserver is unreachable, and knows
a pod (and its IP) as soon as it runs it, before the apiserver's watch says so. Each poll
is the whole list, so a pod missing from it was deleted (from this source's point of
view: the cache keeps it alive while the apiserver still has it). A failed poll changes
nothing in the cache.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from kmeshd.backoff import Backoff
from kmeshd.identity.cache import KUBELET, PODS
from kmeshd.identity.client import ApiError, Client, printable
from kmeshd.identity.objects import Malformed, Naming, Pod, parse_pod
from kmeshd.identity.updates import Crashes, Listed, Rejected, SourceState, Update
from kmeshd.ratelimit import LOG_EVERY_S, Throttle
from kmeshd.supervise import Supervised

log = logging.getLogger("kmeshd")


def pods_of(body: Any, naming: Naming) -> tuple[list[Pod], list[str]]:
    """A PodList body -> its pods and a problem per item skipped. Kubelets starting up
    send `"items": null`, and some have sent null or empty items: those are no pods, not
    errors."""
    if not isinstance(body, dict):
        raise ApiError(f"the kubelet's answer is not a PodList: a {type(body).__name__}")
    kind = body.get("kind", "PodList")
    if kind != "PodList":
        # repr only of a str: a value nested 990 deep has no repr within the recursion limit
        shown = printable(repr(kind[:40])) if isinstance(kind, str) else f"a {type(kind).__name__}"
        raise ApiError(f"the kubelet's answer is not a PodList: kind {shown}")
    items = body.get("items") or []
    if not isinstance(items, list):
        raise ApiError(f"the kubelet's PodList: items: expected a list, got {type(items).__name__}")
    pods: list[Pod] = []
    problems: list[str] = []
    for i, obj in enumerate(items):
        if not obj:
            continue
        try:
            pods.append(parse_pod(obj, naming))
        except Malformed as exc:
            problems.append(f"items[{i}]: {exc}")
    return pods, problems


class Poller:
    """Polls `GET /pods`; runs in its own thread until `stop`."""

    def __init__(
        self,
        client: Client,
        naming: Naming,
        interval: float,
        out: queue.Queue[Update],
        stop: threading.Event,
        backoff: Backoff | None = None,
    ) -> None:
        self.client, self.naming, self.interval = client, naming, interval
        self.out, self.stop = out, stop
        self.backoff = backoff or Backoff(cap=interval)
        self._malformed = Throttle(LOG_EVERY_S)
        self._crash = Crashes("kubelet")

    def poll(self) -> None:
        """One poll; raises ApiError."""
        pods, problems = pods_of(self.client.get_json("/pods"), self.naming)
        if problems:
            self.out.put(Rejected(KUBELET, PODS, len(problems)))
            if self._malformed.ready():
                log.warning(
                    "kubelet: skipped %d pods: %s (kmeshd_identity_objects_rejected_total)",
                    len(problems),
                    printable("; ".join(problems[:3])),
                )
        self.out.put(Listed(KUBELET, PODS, tuple(pods)))
        self.out.put(SourceState(KUBELET, PODS, ""))

    def run(self) -> None:
        """Until `stop`. Whatever else breaks a poll (a bug, an input nothing foresaw) is
        logged and reported as the source's error, and polling goes on after a backoff."""
        while not self.stop.is_set():
            try:
                self.poll()
                self.backoff.reset()
                delay = self.interval
            except ApiError as exc:
                self.out.put(SourceState(KUBELET, PODS, str(exc)))
                delay = self.backoff.next()
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
            except Exception as exc:
                self.out.put(SourceState(KUBELET, PODS, self._crash.seen(exc)))
                delay = self.backoff.next()
            self.stop.wait(delay)


def start_poller(
    client: Client, naming: Naming, interval: float, out: queue.Queue[Update], stop: threading.Event
) -> Poller:
    poller = Poller(client, naming, interval, out, stop)
    Supervised("kubelet", poller.run, stop).start()  # run() survives its own failures
    return poller
