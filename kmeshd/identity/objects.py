"""Pure: Kubernetes API objects (decoded JSON) -> the few facts kmeshd keeps about them.

A pod becomes the identity Istio and Kmesh would give it (Istio's rules, see
`workload_name`); a Service its virtual IPs and TCP ports; an EndpointSlice the pod
addresses and (already numeric) target ports behind a service. Everything else in the
objects is dropped here, so the cache holds a few hundred bytes per pod, not the pod.

Objects come from outside: a field of the wrong type or a missing one makes the object
malformed (`Malformed`, with the field), never a crash and never a half-filled identity.
So does a value no identity may hold: a port outside 1-65535 (the cache packs an address
and a port in one int: port 65616 would name another address's port 80), an address that
is not a string (ipaddress takes ints too), a string that is not valid UTF-8 (JSON's
"\ud800" decodes to a lone surrogate, which no metric label or log line can carry).
Decoded JSON objects are dicts, and are checked as such: an isinstance() against the
Mapping ABC costs several times as much, at every field of every watch event.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kmeshd.config import DEFAULT_CLUSTER, DEFAULT_CLUSTER_DOMAIN, DEFAULT_TRUST_DOMAIN
from kmeshd.identity.model import IPAddress, Service, ServicePort, Workload, ip_key, plain_ip

# Istio: a Job named <cronjob>-<scheduled time in minutes, 8 to 10 digits> belongs to a CronJob.
_CRONJOB_JOB = re.compile(r"(.+)-\d{8,10}$")
_TERMINAL = frozenset({"Succeeded", "Failed"})


class Malformed(ValueError):
    """An API object kmeshd cannot use; the message names the field."""


@dataclass(frozen=True)
class Naming:
    """Cluster-wide settings that go into every identity."""

    cluster: str = DEFAULT_CLUSTER
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod as the cache keeps it."""

    uid: str
    node: str
    created: float  # creationTimestamp as a Unix time; 0 when absent (static pods)
    host_network: bool  # shares its node's addresses: never an identity for them
    terminal: bool  # Succeeded or Failed: its IP may already belong to another pod
    workload: Workload  # addresses included

    @property
    def key(self) -> tuple[str, str]:
        return (self.workload.namespace, self.workload.name)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """One EndpointSlice: the addresses and target ports of one service."""

    namespace: str
    name: str  # the slice's name
    service: tuple[str, str]  # (namespace, name) of its service (kubernetes.io/service-name)
    addresses: tuple[int, ...]  # ip_key() of each address: 28 bytes each, not 84
    ports: tuple[int, ...]  # TCP target ports


# -- field access ---------------------------------------------------------------------------


def _type(value: Any) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _text(value: str, path: str) -> str:
    """`value`, if it can become a label value and a log line: valid UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start : exc.end]
        raise Malformed(f"{path}: {bad!a} is not valid UTF-8 (a lone surrogate)") from None
    return value


def _field(obj: Mapping[str, Any], path: str, kind: type, default: Any = None) -> Any:
    """obj["a"]["b"] for path "a.b", checked against `kind` (a str: valid UTF-8 too);
    `default` when absent or null."""
    value: Any = obj
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(value, dict):
            where = ".".join(parts[:i]) or "the object"
            raise Malformed(f"{where}: expected an object, got {type(value).__name__}")
        value = value.get(part)
        if value is None:
            return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Malformed(f"{path}: expected {kind.__name__}, got {_type(value)}")
    return _text(value, path) if isinstance(value, str) else value


def _required(obj: Mapping[str, Any], path: str) -> str:
    value = _field(obj, path, str, "")
    if not value:
        raise Malformed(f"{path}: missing")
    return str(value)


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    """Label values become metric labels: every one must be a string, and valid UTF-8."""
    labels: dict[str, Any] = _field(obj, "metadata.labels", dict, {})
    for key, value in labels.items():
        _text(key, "metadata.labels")
        if not isinstance(value, str):
            raise Malformed(f"metadata.labels[{key!r}]: expected str, got {_type(value)}")
        _text(value, f"metadata.labels[{key!r}]")
    return labels


def _ip(text: Any, path: str) -> IPAddress:
    """An address from its text. Only from text: ipaddress also makes one of an int (and
    of True), which no API object holds where an address belongs."""
    if not isinstance(text, str):
        raise Malformed(f"{path}: expected an IP address string, got {_type(text)}")
    try:
        return plain_ip(ipaddress.ip_address(text))
    except ValueError:
        raise Malformed(f"{path}: {text!r} is not an IP address") from None


def _port(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Malformed(f"{path}: expected a port number, got {_type(value)}")
    if not 1 <= value <= 65535:
        raise Malformed(f"{path}: {value} is not a port (1-65535)")
    return value


def _timestamp(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError):
        raise Malformed(f"metadata.creationTimestamp: {text!r} is not a time") from None


# -- pods -----------------------------------------------------------------------------------


def _controller(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The controller's reference, its name checked: it may become the workload label."""
    refs = _field(obj, "metadata.ownerReferences", list, [])
    for i, ref in enumerate(refs):
        if isinstance(ref, dict) and ref.get("controller") is True:
            _field(ref, "name", str)
            _field(ref, "kind", str)
            return ref
        if not isinstance(ref, dict):
            raise Malformed(f"metadata.ownerReferences[{i}]: expected an object, got {_type(ref)}")
    return None


def workload_name(obj: Mapping[str, Any]) -> str:
    """Istio's workload name: the label, else the controller (seen through ReplicaSets and
    cron Jobs), else the pod's name. Only a pod with generateName was made by a controller:
    a static pod's mirror has a Node owner and keeps its own name."""
    labels = _labels(obj)
    if labels.get("service.istio.io/workload-name"):
        return labels["service.istio.io/workload-name"]
    name = _required(obj, "metadata.name")
    ref = _controller(obj)
    if not _field(obj, "metadata.generateName", str, "") or ref is None:
        return name
    kind, owner = ref.get("kind"), ref.get("name")
    if not isinstance(owner, str) or not owner:
        return name
    if kind == "ReplicaSet":
        for hash_label in ("pod-template-hash", "rollouts-pod-template-hash"):
            suffix = "-" + labels.get(hash_label, "")
            if suffix != "-" and owner.endswith(suffix):
                return owner[: -len(suffix)]
    if kind == "ReplicationController" and labels.get("deploymentconfig"):
        return labels["deploymentconfig"]
    if kind == "Job" and (match := _CRONJOB_JOB.match(owner)):
        return match.group(1)
    return owner


def _first(labels: Mapping[str, str], names: tuple[str, ...], default: str) -> str:
    return next((labels[n] for n in names if labels.get(n)), default)


def canonical(obj: Mapping[str, Any], workload: str) -> tuple[str, str]:
    """(canonical service, canonical revision), by Istio's label precedence."""
    labels = _labels(obj)
    service = _first(
        labels, ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"), workload
    )
    revision = _first(
        labels,
        ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"),
        "latest",
    )
    return service, revision


def pod_addresses(obj: Mapping[str, Any]) -> tuple[IPAddress, ...]:
    """status.podIPs (dual stack), else the older status.podIP; in order, no repeats."""
    ips = [
        _ip(entry.get("ip") if isinstance(entry, dict) else entry, f"status.podIPs[{i}].ip")
        for i, entry in enumerate(_field(obj, "status.podIPs", list, []))
    ]
    single = _field(obj, "status.podIP", str, "")
    if not ips and single:
        ips.append(_ip(single, "status.podIP"))
    return tuple(dict.fromkeys(ips))


def parse_pod(obj: Any, naming: Naming) -> Pod:
    """A pod object -> Pod; raises Malformed."""
    if not isinstance(obj, dict):
        raise Malformed("not an object")
    namespace = _required(obj, "metadata.namespace")
    workload = workload_name(obj)
    service, revision = canonical(obj, workload)
    account = _field(obj, "spec.serviceAccountName", str, "") or _field(
        obj, "spec.serviceAccount", str, "default"
    )
    identity = Workload(
        name=_required(obj, "metadata.name"),
        workload=sys.intern(workload),
        namespace=sys.intern(namespace),
        canonical_service=sys.intern(service),
        canonical_revision=sys.intern(revision),
        principal=sys.intern(f"spiffe://{naming.trust_domain}/ns/{namespace}/sa/{account}"),
        cluster=naming.cluster,
        addresses=pod_addresses(obj),
    )
    return Pod(
        uid=_required(obj, "metadata.uid"),
        node=sys.intern(_field(obj, "spec.nodeName", str, "")),
        created=_timestamp(_field(obj, "metadata.creationTimestamp", str)),
        host_network=_field(obj, "spec.hostNetwork", bool, False),
        terminal=_field(obj, "status.phase", str, "") in _TERMINAL,
        workload=identity,
    )


# -- services and endpoint slices -----------------------------------------------------------


def _tcp(entry: Any, path: str) -> bool:
    if not isinstance(entry, dict):
        raise Malformed(f"{path}: expected an object, got {_type(entry)}")
    return bool(_field(entry, "protocol", str, "TCP") == "TCP")


def _target_port(value: Any, port: int, path: str) -> int:
    """The numeric target port; 0 for a named one (only the EndpointSlices resolve those,
    and lookups by target port go through them)."""
    if value is None:
        return port
    if isinstance(value, str):
        _text(value, path)
        return 0
    return _port(value, path)


def parse_service(obj: Any, naming: Naming) -> Service:
    """A Service -> its cluster IPs (none when headless) and TCP ports. Target ports stay
    out: the EndpointSlices carry them already resolved, named ones included."""
    if not isinstance(obj, dict):
        raise Malformed("not an object")
    name = _required(obj, "metadata.name")
    namespace = _required(obj, "metadata.namespace")
    path = "spec.clusterIPs"
    ips = _field(obj, path, list, [])
    if not ips:
        path, ips = "spec.clusterIP", [_field(obj, "spec.clusterIP", str, "")]
    vips = tuple(_ip(ip, f"{path}[{i}]") for i, ip in enumerate(ips) if ip != "" and ip != "None")
    ports = []
    for i, entry in enumerate(_field(obj, "spec.ports", list, [])):
        if _tcp(entry, f"spec.ports[{i}]"):
            port = _port(entry.get("port"), f"spec.ports[{i}].port")
            target = _target_port(entry.get("targetPort"), port, f"spec.ports[{i}].targetPort")
            ports.append(ServicePort(port, target))
    return Service(
        name=name,
        namespace=sys.intern(namespace),
        hostname=f"{name}.{namespace}.svc.{naming.cluster_domain}",
        addresses=vips,
        ports=tuple(ports),
    )


def parse_endpoint_slice(obj: Any) -> Endpoints:
    """An EndpointSlice -> the addresses and TCP ports behind its service. Terminating
    endpoints stay: their open connections still belong to the service."""
    if not isinstance(obj, dict):
        raise Malformed("not an object")
    addresses: list[int] = []
    for i, endpoint in enumerate(_field(obj, "endpoints", list, [])):
        if not isinstance(endpoint, dict):
            raise Malformed(f"endpoints[{i}]: expected an object")
        for j, text in enumerate(_field(endpoint, "addresses", list, [])):
            addresses.append(ip_key(_ip(text, f"endpoints[{i}].addresses[{j}]")))
    # A null port means "all ports", which names no port: left out.
    ports = [
        _port(entry["port"], f"ports[{i}].port")
        for i, entry in enumerate(_field(obj, "ports", list, []))
        if _tcp(entry, f"ports[{i}]") and entry.get("port") is not None
    ]
    namespace = sys.intern(_required(obj, "metadata.namespace"))
    return Endpoints(
        namespace=namespace,
        name=_required(obj, "metadata.name"),
        service=(namespace, _labels(obj).get("kubernetes.io/service-name", "")),
        addresses=tuple(dict.fromkeys(addresses)),
        ports=tuple(sorted(set(ports))),
    )


# -- keys of deleted objects ----------------------------------------------------------------


def pod_key(obj: Any) -> str:
    """The key a deleted pod is known by in the cache: its uid."""
    if not isinstance(obj, dict):
        raise Malformed("not an object")
    return _required(obj, "metadata.uid")


def namespaced_key(obj: Any) -> tuple[str, str]:
    """The key a deleted Service or EndpointSlice is known by: (namespace, name)."""
    if not isinstance(obj, dict):
        raise Malformed("not an object")
    return (_required(obj, "metadata.namespace"), _required(obj, "metadata.name"))
