"""The static inventory (kmeshd.toml(5), INVENTORY): identities on hosts without Kubernetes.

TOML -> an `Identities` snapshot. Besides each entry's own keys, the file is checked as a
whole: an address belongs to one workload, a service selects workloads that exist in its
namespace, and a virtual IP and port lead to one service, so that lookups never depend
on which entry happened to come first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

from kmeshd.config import DEFAULT_CLUSTER, DEFAULT_CLUSTER_DOMAIN, DEFAULT_TRUST_DOMAIN
from kmeshd.files import INVENTORY_LIMIT
from kmeshd.identity.model import (
    UNKNOWN,
    Identities,
    IPAddress,
    Service,
    ServicePort,
    Workload,
    plain_ip,
)
from kmeshd.validate import (
    Problems,
    Table,
    dns_label_problem,
    dns_subdomain_problem,
    quote,
    read_text,
    read_toml,
    trust_domain_problem,
)

_TOP_KEYS = ("cluster", "trust_domain", "workload", "service")
_WORKLOAD_KEYS = (
    "name",
    "workload",
    "namespace",
    "addresses",
    "canonical_service",
    "canonical_revision",
    "service_account",
)
_SERVICE_KEYS = ("name", "namespace", "hostname", "addresses", "ports", "workloads")
_PORT_KEYS = ("port", "target_port")


class _Claims:
    """Who owns what so far: workload addresses, service VIP:ports, names per namespace."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.addresses: dict[IPAddress, str] = {}
        self.vips: dict[tuple[IPAddress, int], str] = {}
        self.names: dict[tuple[str, str, str], str] = {}

    def name(self, t: Table, kind: str, namespace: str, name: str) -> None:
        """Two instances (or two services) of one name in one namespace are one too many."""
        first = self.names.setdefault((kind, namespace, name), t.key)
        if first != t.key and name:
            where = f"in namespace {quote(namespace)}"
            t.problem("name", f"{quote(name)} {where} is already {first}")

    def address(self, key: str, ip: IPAddress, owner: str) -> None:
        first = self.addresses.setdefault(ip, owner)
        if first != owner:
            self.problems.add(key, f"{ip} is already the address of {first}")

    def vip(self, key: str, ip: IPAddress, ports: list[ServicePort], owner: str) -> None:
        # A VIP that is also a pod address would make the two lookups disagree.
        if ip in self.addresses:
            self.problems.add(key, f"{ip} is already the address of {self.addresses[ip]}")
        for port in dict.fromkeys(p.port for p in ports):
            first = self.vips.setdefault((ip, port), owner)
            if first != owner:
                where = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
                self.problems.add(key, f"{where} is already a port of {first}")


def _owner(t: Table, name: str) -> str:
    """How problems name an entry: workload[0] (httpbin-5c5944c58c-v9mlk)."""
    return f"{t.key} ({name})" if name else t.key


_NEVER = "which can never be a connection's address"
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _address(t: Table, key: str, text: str) -> IPAddress | None:
    try:
        ip = plain_ip(ipaddress.ip_address(text))
    except ValueError:
        t.problems.add(key, f"{quote(text)} is not an IP address")
        return None
    if problem := _never_connected(ip):
        t.problems.add(key, f"{quote(text)} {problem}")
        return None
    return ip


def _never_connected(ip: IPAddress) -> str | None:
    """Why no TCP connection can have `ip` as an end, or None: the kernel reports
    addresses without a zone, and connects to none of the others."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        plain = str(ip).split("%", 1)[0]
        return f'has a zone index, {_NEVER} (write "{plain}")'
    if ip.is_unspecified:
        return f"is the unspecified address, {_NEVER}"
    if ip == _BROADCAST:
        return f"is the broadcast address, {_NEVER}"
    if ip.is_multicast:
        return f"is a multicast address, {_NEVER}"
    return None


def _name(t: Table, key: str, default: str | None, check: Callable[[str], str | None]) -> str:
    """A name that must not be empty and must pass `check` (a Kubernetes name rule)."""
    value = t.nonempty(key, default)
    if value and (problem := check(value)) is not None:
        t.problem(key, problem)
    return value


def _namespace(t: Table) -> str:
    return _name(t, "namespace", "default", lambda s: dns_label_problem(s, "a namespace"))


def _addresses(t: Table, required: bool) -> list[tuple[str, IPAddress]]:
    """The valid addresses as (key path, address); bad ones are noted and left out."""
    pairs = t.strings("addresses")
    if required and not t.has("addresses"):
        t.problem("addresses", "missing (required)")
    elif required and t.raw("addresses") == []:
        t.problem("addresses", "must list at least one IPv4 or IPv6 address")
    found = [(key, _address(t, key, text)) for key, text in pairs]
    valid = [(key, ip) for key, ip in found if ip is not None]
    seen: set[IPAddress] = set()
    for key, ip in valid:
        if ip in seen:
            t.problems.add(key, f"{ip} is listed twice")
        seen.add(ip)
    return valid


def _workload(t: Table, cluster: str, domain: str, claims: _Claims) -> Workload:
    name = _name(t, "name", None, lambda s: dns_subdomain_problem(s, "an instance name"))
    workload = t.nonempty("workload", name)
    namespace = _namespace(t)
    claims.name(t, "workload", namespace, name)
    addresses = _addresses(t, required=True)
    for key, ip in addresses:
        claims.address(key, ip, _owner(t, name))
    canonical_service = t.nonempty("canonical_service", workload)
    canonical_revision = t.nonempty("canonical_revision", "latest")
    account = _name(
        t, "service_account", "", lambda s: dns_subdomain_problem(s, "a service account")
    )
    return Workload(
        name=name,
        workload=workload,
        namespace=namespace,
        canonical_service=canonical_service,
        canonical_revision=canonical_revision,
        principal=f"spiffe://{domain}/ns/{namespace}/sa/{account}" if account else UNKNOWN,
        cluster=cluster,
        addresses=tuple(ip for _, ip in addresses),
    )


def _port(t: Table, name: str, default: int | None) -> int:
    port = t.integer(name, default)
    # type() and not isinstance(): `port = true` is a wrong type, already noted.
    if type(t.raw(name)) is int and not 1 <= port <= 65535:
        t.problem(name, f"{port} is not a port (use 1-65535)")
    return port


def _ports(t: Table) -> list[ServicePort]:
    ports: list[ServicePort] = []
    for entry in t.tables("ports", _PORT_KEYS):
        port = _port(entry, "port", None)
        if port in {p.port for p in ports}:
            entry.problem("port", f"{port} is listed twice")
        ports.append(ServicePort(port, _port(entry, "target_port", port)))
    return ports


def _selected(t: Table, namespace: str, known: set[tuple[str, str]]) -> tuple[str, ...]:
    """The workload names this service selects; each must exist in the service's namespace."""
    names = t.strings("workloads")
    for key, name in names:
        if (namespace, name) not in known:
            t.problems.add(key, f"no workload named {quote(name)} in namespace {quote(namespace)}")
    return tuple(name for _, name in names)


def _service(t: Table, known: set[tuple[str, str]], claims: _Claims) -> Service:
    name = _name(t, "name", None, lambda s: dns_label_problem(s, "a service name"))
    namespace = _namespace(t)
    claims.name(t, "service", namespace, name)
    hostname = t.nonempty("hostname", f"{name}.{namespace}.svc.{DEFAULT_CLUSTER_DOMAIN}")
    vips = _addresses(t, required=False)
    ports = _ports(t)
    for key, ip in vips:
        claims.vip(key, ip, ports, _owner(t, name))
    return Service(
        name=name,
        namespace=namespace,
        hostname=hostname,
        addresses=tuple(ip for _, ip in vips),
        ports=tuple(ports),
        workloads=_selected(t, namespace, known),
    )


def parse_inventory(text: str, path: Path) -> Identities:
    """The identities in `text`; ConfigError with every problem found."""
    problems = Problems(path)
    doc = Table(read_toml(text, path), "", problems, _TOP_KEYS)
    cluster = doc.nonempty("cluster", DEFAULT_CLUSTER)
    domain = _name(doc, "trust_domain", DEFAULT_TRUST_DOMAIN, trust_domain_problem)
    claims = _Claims(problems)
    workloads = [
        _workload(t, cluster, domain, claims) for t in doc.tables("workload", _WORKLOAD_KEYS)
    ]
    known = {(w.namespace, w.workload) for w in workloads}
    services = [_service(t, known, claims) for t in doc.tables("service", _SERVICE_KEYS)]
    problems.raise_if_any()
    return Identities(tuple(workloads), tuple(services))


def load_inventory(path: Path, explicit: bool) -> tuple[Identities, list[str]]:
    """The inventory in `path` and warnings; a missing default-path file is empty, not an error."""
    text = read_text(path, missing_ok=not explicit, limit=INVENTORY_LIMIT)
    if text is None:
        return Identities(), [f"{path}: not found; starting with no identities"]
    return parse_inventory(text, path), []
