"""Property-based: whatever JSON the apiserver or the kubelet sends, the pure parsers of
the Kubernetes boundary either give a valid identity or reject with the documented error
(Malformed for an object, ApiError for an envelope), never anything else; and what they
give holds only ports of 1-65535, addresses from strings, and valid UTF-8."""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kmeshd.identity import apiserver
from kmeshd.identity.client import ApiError, decode, lines
from kmeshd.identity.kubelet import pods_of
from kmeshd.identity.model import Service
from kmeshd.identity.objects import (
    Endpoints,
    Malformed,
    Naming,
    Pod,
    namespaced_key,
    parse_endpoint_slice,
    parse_pod,
    parse_service,
    pod_key,
)

NAMING = Naming()

# Text with what breaks label values: lone surrogates, control characters, non-ASCII.
TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=()), max_size=12),
    st.sampled_from(["", "None", "TCP", "UDP", "10.1.0.5", "::ffff:10.0.0.1", "fd00::1%eth0",
                     "10.0.0.300", "\ud800", "web\udfff", "1" * 50, "0", "-1", "x y"]),
)  # fmt: skip
NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 80, 65535, 65536, 65616, -1, 2**32, 167772161]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
JSON = st.recursive(
    st.one_of(st.none(), NUMBER, TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=20,
)


def deep(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


# Hypothesis prints each example, recursively: values past a few hundred levels are made
# inside test_values_nested_as_deep_as_json_decodes instead.
VALUE = st.one_of(JSON, st.integers(0, 300).map(deep))

POD = {
    "metadata": {
        "name": "web-7c8f6b9d4-x2x7q",
        "generateName": "web-7c8f6b9d4-",
        "namespace": "shop",
        "uid": "u-1",
        "resourceVersion": "12",
        "creationTimestamp": "2026-12-01T10:00:00Z",
        "labels": {"pod-template-hash": "7c8f6b9d4", "app": "web", "version": "v1"},
        "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7c8f6b9d4", "controller": True}],
    },
    "spec": {"nodeName": "n1", "serviceAccountName": "web", "hostNetwork": False},
    "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}]},
}
SERVICE = {
    "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "13"},
    "spec": {
        "clusterIP": "10.96.0.20",
        "clusterIPs": ["10.96.0.20", "fd00::20"],
        "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}, {"port": 443}],
    },
}
SLICE = {
    "metadata": {
        "name": "web-abcde",
        "namespace": "shop",
        "resourceVersion": "14",
        "labels": {"kubernetes.io/service-name": "web"},
    },
    "endpoints": [{"addresses": ["10.1.0.5"]}, {"addresses": ["fd00::5"]}],
    "ports": [{"port": 8080, "protocol": "TCP"}, {"port": None}],
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a document where a value could be replaced."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


@st.composite
def mutated(draw: st.DrawFn, template: dict[str, Any]) -> Any:
    """`template` with a few of its values (or new keys) replaced by anything."""
    doc = copy.deepcopy(template)
    paths = _paths(template)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        value = draw(VALUE)
        if not path:
            return value
        parent = doc
        try:
            for step in path[:-1]:
                parent = parent[step]
            if isinstance(parent, dict) and draw(st.booleans()):
                parent[draw(TEXT)] = value  # a new key next to it
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier replacement removed this place
    return doc


def _utf8(text: str) -> None:
    assert isinstance(text, str)
    text.encode("utf-8")


def _address(ip: Any) -> None:
    assert type(ip) in (ipaddress.IPv4Address, ipaddress.IPv6Address)


def _port(port: Any) -> None:
    assert type(port) is int and 1 <= port <= 65535


def check_pod(p: Pod) -> None:
    for text in (p.uid, p.node, p.workload.name, *p.workload.label_values()):
        _utf8(text)
    for ip in p.workload.addresses:
        _address(ip)
    assert type(p.host_network) is bool and type(p.created) is float


def check_service(s: Service) -> None:
    for text in (s.name, s.namespace, s.hostname):
        _utf8(text)
    for ip in s.addresses:
        _address(ip)
    for port in s.ports:
        _port(port.port)
        assert type(port.target_port) is int and 0 <= port.target_port <= 65535


def check_slice(e: Endpoints) -> None:
    for text in (e.namespace, e.name, *e.service):
        _utf8(text)
    for port in e.ports:
        _port(port)
    assert all(type(a) is int and 0 <= a < 2**129 for a in e.addresses)


@given(st.one_of(mutated(POD), VALUE))
def test_pods(obj: Any) -> None:
    try:
        pod = parse_pod(obj, NAMING)
    except Malformed:
        return
    check_pod(pod)


@given(st.one_of(mutated(SERVICE), VALUE))
def test_services(obj: Any) -> None:
    try:
        service = parse_service(obj, NAMING)
    except Malformed:
        return
    check_service(service)


@given(st.one_of(mutated(SLICE), VALUE))
def test_endpoint_slices(obj: Any) -> None:
    try:
        endpoints = parse_endpoint_slice(obj)
    except Malformed:
        return
    check_slice(endpoints)


@given(st.one_of(mutated(POD), mutated(SLICE), VALUE))
def test_keys_of_deleted_objects(obj: Any) -> None:
    for key in (pod_key, namespaced_key):
        try:
            value = key(obj)
        except Malformed:
            continue
        for text in (value,) if isinstance(value, str) else value:
            _utf8(text)
            assert text


LIST = {"kind": "PodList", "metadata": {"resourceVersion": "20", "continue": "abc"}, "items": [POD]}


@given(st.one_of(mutated(LIST), VALUE))
def test_list_pages(body: Any) -> None:
    try:
        page = apiserver.list_page(body)
    except ApiError:
        return
    assert apiserver.valid_version(page.version) == page.version
    assert isinstance(page.items, list) and isinstance(page.token, str)
    page.token.encode("ascii")


@given(st.one_of(mutated({"type": "MODIFIED", "object": POD}), VALUE))
def test_watch_events(event: Any) -> None:
    try:
        parsed = apiserver.watch_event(event)
    except ApiError:
        return
    assert parsed.kind in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK")
    assert isinstance(parsed.obj, dict)
    assert parsed.version is None or apiserver.valid_version(parsed.version)


@given(st.one_of(mutated({"kind": "PodList", "items": [POD, None, POD]}), VALUE))
def test_kubelet_pod_lists(body: Any) -> None:
    try:
        pods, problems = pods_of(body, NAMING)
    except ApiError:
        return
    for pod in pods:
        check_pod(pod)
    for problem in problems:
        _utf8(problem)


@given(st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64),
                 st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)))  # fmt: skip
def test_decoding_json(data: bytes) -> None:
    """Anything json.loads cannot turn into values (deep nesting included) is an ApiError."""
    try:
        decode(data, "GET x")
    except ApiError as exc:
        str(exc).encode("utf-8")


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_lines_split_like_split(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    expected = [line for line in data.split(b"\n") if line.strip()]
    try:
        got = list(lines(iter(chunks), 30, "watch x"))
    except ApiError:
        assert any(len(line) > 30 for line in data.split(b"\n"))
        return
    assert got == expected


TEMPLATES: dict[str, tuple[dict[str, Any], Callable[[Any], Any], type[Exception]]] = {
    "pod": (POD, lambda o: parse_pod(o, NAMING), Malformed),
    "service": (SERVICE, lambda o: parse_service(o, NAMING), Malformed),
    "slice": (SLICE, parse_endpoint_slice, Malformed),
    "list": (LIST, apiserver.list_page, ApiError),
    "event": ({"type": "DELETED", "object": POD}, apiserver.watch_event, ApiError),
    "kubelet": ({"kind": "PodList", "items": [POD]}, lambda o: pods_of(o, NAMING), ApiError),
}


@given(st.sampled_from(sorted(TEMPLATES)), st.integers(0, 10_000), st.integers(0, 990))
def test_values_nested_as_deep_as_json_decodes(name: str, where: int, depth: int) -> None:
    """A value nested up to json's own limit, anywhere in an object: rejected or ignored,
    never a RecursionError from a repr or a walk."""
    template, parse, rejection = TEMPLATES[name]
    doc: Any = copy.deepcopy(template)
    path = _paths(template)[where % len(_paths(template))]
    if not path:
        doc = deep(depth)
    else:
        parent: Any = doc
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = deep(depth)
    try:
        parse(doc)
    except rejection as exc:
        str(exc).encode("utf-8")
