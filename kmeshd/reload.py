"""SIGHUP: what a new config changes, and everything that can fail, done before anything
running is touched.

`prepare` reads the config file again and opens what the new config needs (the identity
source, the access-log sinks); a ConfigError there leaves the daemon exactly as it was.
What it returns, a `Reload`, is then applied by the daemon, which cannot fail.

    applied at once      identity source and inventory, access-log sinks, accesslog.max_rate
                         and periodic, metrics.interval, connection_security_policy,
                         series_ttl and max_series, bpf.flow_expiry, bpf.live_updates
                         turned off, metrics.web_config (and the certificates, keys
                         and users it names, read again whether or not it changed)
    after a restart      metrics.listen, metrics.histograms, bpf.cgroup, bpf.pin_dir,
                         bpf.max_flows, bpf.live_updates turned on by a daemon started
                         without it
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kmeshd.accesslog.sinks import Sink, open_sinks
from kmeshd.config import Config, load_config
from kmeshd.errors import ConfigError
from kmeshd.export.webaccess import Access, open_access
from kmeshd.identity.sources import IdentitySource, KubernetesSource

SourceOpener = Callable[[Config, IdentitySource | None], IdentitySource]

# Keys whose new value takes effect only when the daemon starts again.
RESTART_KEYS: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("metrics.listen", lambda c: c.metrics.listen),
    ("bpf.cgroup", lambda c: c.bpf.cgroup),
    ("bpf.pin_dir", lambda c: c.bpf.pin_dir),
    ("bpf.max_flows", lambda c: c.bpf.max_flows),
    ("metrics.histograms", lambda c: c.metrics.histograms),
    ("metrics.state_file", lambda c: c.metrics.state_file),
)


def needs_restart(old: Config, new: Config) -> list[str]:
    """The keys of RESTART_KEYS whose value differs."""
    return [key for key, value in RESTART_KEYS if value(new) != value(old)]


def identities_changed(old: Config, new: Config) -> bool:
    """Whether the identity settings differ (the inventory file is read again regardless)."""
    return new.identity != old.identity or new.kubernetes != old.kubernetes


@dataclass
class Reload:
    """A new config, opened and ready to apply."""

    config: Config
    restart_keys: list[str]
    source: IdentitySource | None  # None: keep the running one (its settings did not change)
    sinks: list[Sink] | None  # None: keep the running sinks (reopened, for logrotate)
    access: Access  # who may scrape /metrics: always read again (rotated certificates)


def prepare(running: Config, source: IdentitySource, open_source: SourceOpener) -> Reload:
    """The running config's file, read again and opened; ConfigError changes nothing."""
    new = load_config(running.path, explicit=True)
    access = open_access(new)  # first: it opens nothing that would need closing
    # The inventory is read again; Kubernetes sources are restarted only when their
    # settings changed, keeping the identities already known.
    keep = isinstance(source, KubernetesSource) and not identities_changed(running, new)
    new_source = None if keep else open_source(new, source)
    try:
        sinks = open_sinks(new) if new.accesslog != running.accesslog else None
    except ConfigError:
        if new_source is not None:
            new_source.close()
        raise
    return Reload(new, needs_restart(running, new), new_source, sinks, access)
