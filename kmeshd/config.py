"""kmeshd.toml -> validated, frozen dataclasses (every key: kmeshd.toml(5)).

Every key has a default (the dataclass defaults below; a test holds etc/kmeshd.toml to
them), so an empty file is valid, and so is an absent file at the default path. All
problems are collected and raised as one ConfigError of `file: key.path: problem` lines.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

from kmeshd.validate import (
    Problems,
    Table,
    dns_subdomain_problem,
    huge,
    quote,
    read_text,
    read_toml,
    trust_domain_problem,
    url_problem,
)

DEFAULT_CONFIG_PATH = Path("/etc/kmeshd/kmeshd.toml")
IDENTITY_SOURCES = ("inventory", "kubernetes")
HISTOGRAMS = ("duration", "srtt", "min_rtt", "connect")  # what metrics.histograms may name
# Ranges of the bounded keys (kmeshd.toml(5) says why each).
KUBELET_INTERVAL_RANGE = (0.1, 3600.0)
INTERVAL_RANGE = (0.1, 3600.0)
SERIES_TTL_RANGE = (1.0, 7 * 86400.0)
MAX_SERIES_RANGE = (1, 1_000_000)
MAX_RATE_RANGE = (0, 1_000_000)
PERIODIC_RANGE = (1.0, 86400.0)
FLOW_EXPIRY_RANGE = (1.0, 86400.0)
MAX_FLOWS_RANGE = (1024, 1 << 20)
PATH_MAX = 4095  # bytes of a path the kernel takes (PATH_MAX, 4096, less the NUL)
# What every identity carries unless configured: the [kubernetes] keys' defaults, and the
# inventory's.
DEFAULT_CLUSTER = "Kubernetes"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    source: str = "inventory"
    inventory: Path = Path("/etc/kmeshd/inventory.toml")
    inventory_explicit: bool = False  # set in the file: missing is an error, not a warning


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    kubeconfig: str = ""  # "" = $KUBECONFIG, /etc/kmeshd/kubeconfig, in-cluster
    node_name: str = ""  # "" = this host's name
    kubelet_url: str = "https://127.0.0.1:10250"  # "" = don't use the kubelet
    kubelet_token_file: str = ""  # "" = the apiserver's credentials
    kubelet_ca_file: str = ""  # "" = the apiserver's CA
    kubelet_interval: float = 10.0  # seconds
    cluster: str = DEFAULT_CLUSTER
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = "127.0.0.1:15020"  # "" disables; parse with parse_listen()
    textfile: str = "/var/lib/prometheus/node-exporter/kmeshd.prom"  # "" disables
    interval: float = 5.0  # seconds
    connection_security_policy: str = "unknown"  # kmeshd cannot see mTLS; an operator can say
    series_ttl: float = 300.0  # seconds a label set of a gone identity stays, idle
    max_series: int = 20000  # label sets per level; past it, the overflow label set
    histograms: tuple[str, ...] = ()  # of HISTOGRAMS: each costs 20 lines per label set
    state_file: str = "/var/lib/kmeshd/counters.json.gz"  # counters for the next start; ""
    web_config: str = ""  # TLS and basic auth for /metrics (export.webconfig); "" = neither
    textfile_explicit: bool = False  # set in the file: its directory must exist
    state_file_explicit: bool = False


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    file: str = "/var/log/kmeshd/accesslog.json"  # "" disables, "-" is standard output
    journald: bool = True
    max_rate: int = 1000  # records per second user space handles; 0 = no limit
    periodic: float = 0.0  # seconds between records of one open connection; 0 = only at close
    file_explicit: bool = False  # set in the file: its directory must exist


@dataclass(frozen=True, slots=True)
class BpfConfig:
    cgroup: str = "auto"  # "auto" = the cgroup v2 root
    pin_dir: str = "/sys/fs/bpf/kmeshd"  # maps and the program link, kept across restarts
    live_updates: bool = True  # open connections' bytes counted as they go, not at close only
    flow_expiry: float = 120.0  # seconds a generation of kernel flow entries lives
    max_flows: int = 65536  # entries of the kernel's flows map


@dataclass(frozen=True, slots=True)
class Config:
    path: Path = DEFAULT_CONFIG_PATH
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    accesslog: AccessLogConfig = field(default_factory=AccessLogConfig)
    bpf: BpfConfig = field(default_factory=BpfConfig)


# Go's time.ParseDuration units, so "1m30s" and "1.5h" mean what operators expect.
_NS_PER_UNIT = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_DURATION = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def parse_duration(text: str) -> float:
    """Seconds in "250ms", "5s", "1m30s"; ValueError (the problem) if not a duration > 0."""
    if not _DURATION.fullmatch(text):
        raise ValueError(
            f"{quote(text)} is not a duration (use a number with a unit: 250ms, 5s, 1m)"
        )
    # Decimal, so that "100ms" is exactly 0.1 and not 0.1 plus rounding error.
    ns = sum(Decimal(n) * _NS_PER_UNIT[unit] for n, unit in _DURATION_PART.findall(text))
    if text.startswith("-") or ns == 0:
        raise ValueError(f"{quote(text)} must be more than 0")
    return float(ns / 10**9)


def _is_hostname(host: str) -> bool:
    labels = host.removesuffix(".").split(".")
    # An all-digit last label is a mistyped IPv4 address (10.0.0.300), not a name.
    if len(host) > 253 or labels[-1].isdigit():
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in labels)


def _split_listen(text: str) -> tuple[str, str, bool]:
    """(host, port, bracketed) of "host:port" or "[v6]:port"; ValueError if neither shape."""
    no_port = f"{quote(text)} has no port (use host:port, such as 127.0.0.1:15020)"
    if text.startswith("["):
        bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text)
        if bracketed is None:
            raise ValueError(f"{quote(text)} is not host:port or [IPv6]:port")
        if bracketed[2] is None:
            raise ValueError(no_port)
        return bracketed[1], bracketed[2], True
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(no_port)
    if ":" in host:
        raise ValueError(f"{quote(text)} is ambiguous (write IPv6 addresses in brackets: [::1]:80)")
    return host, port, False


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


def _check_host(host: str, text: str, bracketed: bool) -> None:
    if not host:
        raise ValueError(f"{quote(text)} has no host (use 0.0.0.0 or [::] for all addresses)")
    if bracketed and not _is_ip(host, 6):
        raise ValueError(f"{quote(host)} is not an IPv6 address")
    if not bracketed and not (_is_ip(host, 4) or _is_hostname(host)):
        raise ValueError(f"{quote(host)} is not an IP address or host name")


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of "host:port" or "[v6]:port"; ValueError (the problem) if malformed."""
    host, port, bracketed = _split_listen(text)
    _check_host(host, text, bracketed)
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"{quote(port)} is not a port number")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {int(port)} is out of range (1-65535)")
    return host, int(port)


def _allowing(allowed: tuple[str, ...], parse: Callable[[str], T]) -> Callable[[str], str | T]:
    """`parse`, except that the special values in `allowed` ("", "-", "auto") pass as they are."""
    return lambda text: text if text in allowed else parse(text)


def _absolute(hint: str = "") -> Callable[[str], str]:
    """A check that a path is absolute; `hint` lists the special values the key also takes."""

    def check(text: str) -> str:
        if not text.startswith("/"):
            raise ValueError(f"{quote(text)} is not an absolute path{hint}")
        if "\0" in text:
            raise ValueError(f"{quote(text)} contains a NUL byte, which no path can (remove it)")
        if len(text.encode("utf-8", "surrogatepass")) > PATH_MAX:
            raise ValueError(f"{quote(text)} is longer than {PATH_MAX} bytes, which no path can be")
        return text

    return check


def _url(text: str) -> str:
    problem = url_problem(text, 'an http:// or https:// URL (or "" for no kubelet)')
    if problem is not None:
        raise ValueError(problem)
    return text


def _checked(check: Callable[[str], str | None]) -> Callable[[str], str]:
    """A parse function of a check that returns the problem or None."""

    def parse(text: str) -> str:
        if (problem := check(text)) is not None:
            raise ValueError(problem)
        return text

    return parse


_NODE_NAME = _allowing(("",), _checked(lambda s: dns_subdomain_problem(s, "a node name")))
_TRUST = _checked(trust_domain_problem)
_CLUSTER_DOMAIN = _checked(lambda s: dns_subdomain_problem(s, "a DNS domain"))


def _listen(text: str) -> str:
    parse_listen(text)  # only to validate: the daemon parses it again where it binds
    return text


def _source(text: str) -> str:
    if text not in IDENTITY_SOURCES:
        raise ValueError(f'{quote(text)} is not a source (use "inventory" or "kubernetes")')
    return text


_DURATION_TYPE = 'a duration string such as "5s"'
_PATH = _absolute()
_PATH_OR_OFF = _allowing(("",), _absolute(' (or "" to disable)'))


def _identity(t: Table, d: IdentityConfig) -> IdentityConfig:
    source = t.parsed("source", d.source, _source)
    inventory = t.parsed("inventory", d.inventory, lambda s: Path(_PATH(s)))
    return IdentityConfig(source, inventory, t.has("inventory"))


def _kubernetes(t: Table, d: KubernetesConfig) -> KubernetesConfig:
    file = _allowing(("",), _absolute(' (or "" for the default)'))
    return KubernetesConfig(
        kubeconfig=t.parsed("kubeconfig", d.kubeconfig, file),
        node_name=t.parsed("node_name", d.node_name, _NODE_NAME),
        kubelet_url=t.parsed("kubelet_url", d.kubelet_url, _allowing(("",), _url)),
        kubelet_token_file=t.parsed("kubelet_token_file", d.kubelet_token_file, file),
        kubelet_ca_file=t.parsed("kubelet_ca_file", d.kubelet_ca_file, file),
        kubelet_interval=_duration_within(
            t, "kubelet_interval", d.kubelet_interval, KUBELET_INTERVAL_RANGE
        ),
        cluster=t.nonempty("cluster", d.cluster),
        trust_domain=t.parsed("trust_domain", d.trust_domain, _TRUST),
        cluster_domain=t.parsed("cluster_domain", d.cluster_domain, _CLUSTER_DOMAIN),
    )


def _metrics(t: Table, d: MetricsConfig) -> MetricsConfig:
    listen = _allowing(("",), _listen)
    return MetricsConfig(
        listen=t.parsed("listen", d.listen, listen, 'a string such as "127.0.0.1:15020"'),
        textfile=t.parsed("textfile", d.textfile, _PATH_OR_OFF),
        interval=_duration_within(t, "interval", d.interval, INTERVAL_RANGE),
        connection_security_policy=t.nonempty(
            "connection_security_policy", d.connection_security_policy
        ),
        series_ttl=_duration_within(t, "series_ttl", d.series_ttl, SERIES_TTL_RANGE),
        max_series=_count_within(t, "max_series", d.max_series, MAX_SERIES_RANGE),
        histograms=_histograms(t, d.histograms),
        state_file=t.parsed("state_file", d.state_file, _PATH_OR_OFF),
        web_config=t.parsed("web_config", d.web_config, _PATH_OR_OFF),
        textfile_explicit=t.has("textfile"),
        state_file_explicit=t.has("state_file"),
    )


def _histograms(t: Table, default: tuple[str, ...]) -> tuple[str, ...]:
    if not t.has("histograms"):
        return default
    chosen = []
    for key, name in t.strings("histograms"):
        if name not in HISTOGRAMS:
            t.problems.add(key, f"{quote(name)} is not a histogram (use {', '.join(HISTOGRAMS)})")
        elif name in chosen:
            t.problems.add(key, f"{quote(name)} is listed twice")
        else:
            chosen.append(name)
    return tuple(chosen)


def _duration_within(t: Table, name: str, default: float, bounds: tuple[float, float]) -> float:
    """A duration from bounds[0] to bounds[1] seconds (both written as durations)."""
    value = t.parsed(name, default, parse_duration, _DURATION_TYPE)
    low, high = bounds
    if not low <= value <= high:
        t.problem(name, f"must be from {_seconds(low)} to {_seconds(high)}")
        return default
    return value


def _count_within(
    t: Table, name: str, default: int, bounds: tuple[int, int], rule: str = ""
) -> int:
    """An integer from bounds[0] to bounds[1]; `rule` words the range if not "from-to"."""
    value = t.integer(name, default)
    low, high = bounds
    if not low <= value <= high:
        got = huge(value) or f"{value:,}"
        t.problem(name, f"must be {rule or f'from {low:,} to {high:,}'}, got {got}")
        return default
    return value


def _seconds(seconds: float) -> str:
    """A bound as the config writes it: 100ms, 1s, 2m, 24h."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def _accesslog(t: Table, d: AccessLogConfig) -> AccessLogConfig:
    hint = ' (or "" to disable, "-" for standard output)'
    file = _allowing(("", "-"), _absolute(hint))
    return AccessLogConfig(
        file=t.parsed("file", d.file, file),
        journald=t.boolean("journald", d.journald),
        max_rate=_max_rate(t, d.max_rate),
        periodic=_periodic(t, d.periodic),
        file_explicit=t.has("file"),
    )


def _off_or_duration(text: str) -> float:
    return 0.0 if text == "" else parse_duration(text)


def _periodic(t: Table, default: float) -> float:
    value = t.parsed("periodic", default, _off_or_duration, '"" or ' + _DURATION_TYPE)
    low, high = PERIODIC_RANGE
    if value and not low <= value <= high:
        t.problem("periodic", f'must be from {_seconds(low)} to {_seconds(high)}, or ""')
        return default
    return value


def _max_rate(t: Table, default: int) -> int:
    low, high = MAX_RATE_RANGE
    rule = f"{low} (no limit) or from 1 to {high:,} records per second"
    return _count_within(t, "max_rate", default, MAX_RATE_RANGE, rule)


def _bpf(t: Table, d: BpfConfig) -> BpfConfig:
    cgroup = _allowing(("auto",), _absolute(' (or "auto" for the cgroup v2 root)'))
    return BpfConfig(
        cgroup=t.parsed("cgroup", d.cgroup, cgroup),
        pin_dir=t.parsed("pin_dir", d.pin_dir, _PATH),
        live_updates=t.boolean("live_updates", d.live_updates),
        flow_expiry=_duration_within(t, "flow_expiry", d.flow_expiry, FLOW_EXPIRY_RANGE),
        max_flows=_count_within(t, "max_flows", d.max_flows, MAX_FLOWS_RANGE),
    )


def _keys(cls: type) -> tuple[str, ...]:
    """The keys a table takes: its dataclass fields, except what the parser derives."""
    return tuple(f.name for f in fields(cls) if not f.name.endswith("_explicit"))


_TABLES = ("accesslog", "bpf", "identity", "kubernetes", "metrics")


def parse_config(text: str, path: Path) -> Config:
    """The validated config in `text`; ConfigError with every problem found."""
    config, problems = parse_config_leniently(text, path)
    problems.raise_if_any()
    return config


def parse_config_leniently(text: str, path: Path) -> tuple[Config, Problems]:
    """The config in `text` with the default in place of each bad value, and the problems;
    ConfigError only when the file is no TOML at all."""
    problems = Problems(path)
    doc = Table(read_toml(text, path), "", problems, _TABLES)
    d = Config()
    config = Config(
        path=path,
        identity=_identity(doc.table("identity", _keys(IdentityConfig)), d.identity),
        kubernetes=_kubernetes(doc.table("kubernetes", _keys(KubernetesConfig)), d.kubernetes),
        metrics=_metrics(doc.table("metrics", _keys(MetricsConfig)), d.metrics),
        accesslog=_accesslog(doc.table("accesslog", _keys(AccessLogConfig)), d.accesslog),
        bpf=_bpf(doc.table("bpf", _keys(BpfConfig)), d.bpf),
    )
    if config.accesslog.periodic and not config.bpf.live_updates:
        # Periodic records come from the same socket sweep that live updates are.
        problems.add(
            "accesslog.periodic",
            'needs bpf.live_updates = true: set it, or set periodic = "" for records at close only',
        )
    return config, problems


def load_config(path: Path = DEFAULT_CONFIG_PATH, explicit: bool = True) -> Config:
    """The config in `path`; if it does not exist and was not named explicitly, the defaults."""
    text = read_text(path, missing_ok=not explicit)
    return parse_config(text or "", path)


def load_config_leniently(
    path: Path = DEFAULT_CONFIG_PATH, explicit: bool = True
) -> tuple[Config, Problems]:
    """As load_config, but a bad value leaves its default and joins the problems returned,
    so a check can go on to what the config points at."""
    text = read_text(path, missing_ok=not explicit)
    return parse_config_leniently(text or "", path)
