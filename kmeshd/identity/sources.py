"""Identity sources as the daemon sees them: something that answers lookups (`view`), takes
in what changed (`refresh`), and says whether it is healthy (`up`).

- `StaticSource`: the inventory file; changes only on reload.
- `KubernetesSource`: the kubelet poller and the apiserver watchers in their threads,
  feeding one `IdentityCache` through a queue that `refresh` drains on the main thread.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping

from kmeshd.config import Config, KubernetesConfig
from kmeshd.errors import ConfigError
from kmeshd.identity import apiserver, credentials, kubelet
from kmeshd.identity.cache import APISERVER, KUBELET, PODS, IdentityCache
from kmeshd.identity.client import Client
from kmeshd.identity.inventory import load_inventory
from kmeshd.identity.kubeconfig import apiserver_credentials
from kmeshd.identity.model import Identities, IdentityView
from kmeshd.identity.objects import Naming
from kmeshd.identity.updates import SourceState, Update, apply

log = logging.getLogger("kmeshd")

SYNC_TIMEOUT_S = 60.0  # start-up waits this long at most for the first answer of each source


class StaticSource:
    """The inventory: one immutable snapshot."""

    def __init__(self, identities: Identities) -> None:
        self.identities = identities
        self.known_version = 0  # changes only on reload, which replaces the source

    def start(self) -> None:
        """Nothing to run."""

    def view(self) -> IdentityView:
        return self.identities

    def refresh(self, now: float) -> None:
        """Nothing arrives between reloads."""

    def wait_synced(
        self, timeout: float, tick: Callable[[], None], stopped: Callable[[], bool] = lambda: False
    ) -> None:
        """Loaded already."""

    def up(self) -> dict[str, bool]:
        return {"inventory": True}

    def rejected(self) -> dict[tuple[str, str], int]:
        """The inventory is checked whole, at load: nothing is skipped at run time."""
        return {}

    def status(self) -> str:
        return "identities from the inventory"

    def close(self) -> None:
        """Nothing runs."""


def load_identities(config: Config) -> Identities:
    identities, warnings = load_inventory(
        config.identity.inventory, config.identity.inventory_explicit
    )
    for warning in warnings:
        log.warning("%s", warning)
    return identities


class KubernetesSource:
    """The kubelet and the apiserver, merged in one cache that survives their failures."""

    def __init__(
        self,
        cfg: KubernetesConfig,
        env: Mapping[str, str] = os.environ,
        cache: IdentityCache | None = None,
    ) -> None:
        api = apiserver_credentials(cfg.kubeconfig, env)
        kubelet_creds = credentials.kubelet_credentials(
            api, cfg.kubelet_url, cfg.kubelet_token_file, cfg.kubelet_ca_file
        )
        self.naming = Naming(cfg.cluster, cfg.trust_domain, cfg.cluster_domain)
        self.cache = cache or IdentityCache("")
        self.cache.node = cfg.node_name or socket.gethostname()
        self.queue: queue.Queue[Update] = queue.Queue()
        self._stop = threading.Event()
        self._api = Client(api)
        self._kubelet = Client(kubelet_creds, cfg.kubelet_url) if kubelet_creds else None
        self._interval = cfg.kubelet_interval
        # (source, resource) -> the last error, "" when the last sync worked
        self.states: dict[tuple[str, str], str | None] = {
            (APISERVER, r.name): None for r in apiserver.RESOURCES
        }
        if self._kubelet is not None:
            self.states[(KUBELET, PODS)] = None

    @property
    def known_version(self) -> int:
        return self.cache.known_version

    def start(self) -> None:
        """Write the kubeconfig's embedded certificates, then start polling and watching."""
        credentials.write_embedded(self._api.creds)
        apiserver.start_watchers(self._api, self.naming, self.queue, self._stop)
        if self._kubelet is not None:
            kubelet.start_poller(self._kubelet, self.naming, self._interval, self.queue, self._stop)

    def view(self) -> IdentityView:
        return self.cache

    def refresh(self, now: float) -> None:
        """Apply what the sources sent since the last call; forget the long dead."""
        while True:
            try:
                update = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(update, SourceState):
                self._state(update)
            else:
                apply(self.cache, update, now)
        self.cache.gc(now)

    def _state(self, s: SourceState) -> None:
        before = self.states.get((s.source, s.resource))
        self.states[(s.source, s.resource)] = s.error
        if s.error and s.error != before:
            log.warning("%s %s: %s; keeping what is known", s.source, s.resource, s.error)
        elif not s.error and before:
            log.info("%s %s: in sync again", s.source, s.resource)

    def wait_synced(
        self, timeout: float, tick: Callable[[], None], stopped: Callable[[], bool] = lambda: False
    ) -> None:
        """Until every source answered once (well or not), at most `timeout` seconds, or
        until `stopped()` (a stop signal: no reason to wait on); `tick` keeps systemd's
        start timeout at bay meanwhile."""
        deadline = time.monotonic() + timeout
        while (
            any(v is None for v in self.states.values())
            and time.monotonic() < deadline
            and not stopped()
        ):
            self.refresh(time.monotonic())
            tick()
            time.sleep(0.05)
        self.refresh(time.monotonic())

    def up(self) -> dict[str, bool]:
        """source -> whether the last sync of each of its resources worked."""
        result: dict[str, bool] = {}
        for (source, _resource), error in self.states.items():
            result[source] = result.get(source, True) and error == ""
        return result

    def rejected(self) -> dict[tuple[str, str], int]:
        """(source, resource) -> objects skipped as not valid so far (kept across a
        reload); 0 for each resource a configured source syncs, so alerts can use it."""
        return {key: self.cache.rejected.get(key, 0) for key in self.states}

    def status(self) -> str:
        """For STATUS= and the start-up log: what is in, what is missing and why."""
        counts = self.cache.counts()
        parts = [f"{counts['pods']} pods, {counts['services']} services"]
        for (source, resource), error in sorted(self.states.items()):
            if error is None:
                parts.append(f"{source} {resource}: no answer yet")
            elif error:
                parts.append(f"{source} {resource} down: {error}")
        return "; ".join(parts)

    def close(self) -> None:
        self._stop.set()
        self._api.close()
        if self._kubelet is not None:
            self._kubelet.close()


IdentitySource = StaticSource | KubernetesSource


def _in_file(config: Config, exc: ConfigError) -> ConfigError:
    """Credential problems name a config key; say which file it is in."""

    def located(problem: str) -> str:
        if problem.startswith("kubernetes."):
            return f"{config.path}: {problem}"
        return re.sub(
            r"\(named by (kubernetes\.\w+)\)$", rf"(named by \1 in {config.path})", problem
        )

    return ConfigError([located(p) for p in exc.problems])


def open_source(config: Config, previous: IdentitySource | None = None) -> IdentitySource:
    """The configured source, not started; raises ConfigError. A Kubernetes source
    replacing another keeps its cache, so a reload loses no identity."""
    if config.identity.source != "kubernetes":
        return StaticSource(load_identities(config))
    cache = previous.cache if isinstance(previous, KubernetesSource) else None
    try:
        return KubernetesSource(config.kubernetes, cache=cache)
    except ConfigError as exc:
        raise _in_file(config, exc) from None


def check_source(config: Config) -> None:
    """What `kmeshd check-config` can check without the network: the inventory, or the
    Kubernetes credentials."""
    open_source(config).close()
