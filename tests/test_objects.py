"""kmeshd.identity.objects: Kubernetes objects -> identities, by Istio's rules."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
import yaml

from kmeshd.identity.model import ServicePort, ip_key
from kmeshd.identity.objects import (
    Malformed,
    Naming,
    canonical,
    namespaced_key,
    parse_endpoint_slice,
    parse_pod,
    parse_service,
    pod_key,
    workload_name,
)
from tests.k8s_server import TESTDATA

NAMING = Naming(cluster="Kubernetes", trust_domain="example.org", cluster_domain="cluster.local")


def pod(
    name: str = "web-7c8f6b9d4-x2x7q",
    generate: str = "web-7c8f6b9d4-",
    owner: tuple[str, str] | None = ("ReplicaSet", "web-7c8f6b9d4"),
    labels: dict[str, str] | None = None,
    controller: bool = True,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "shop", "uid": "u-1", "labels": labels}
    if generate:
        meta["generateName"] = generate
    if owner:
        meta["ownerReferences"] = [{"kind": owner[0], "name": owner[1], "controller": controller}]
    return {"metadata": meta, "spec": {"nodeName": "n1"}, "status": {"podIP": "10.1.0.5"}}


HASH = {"pod-template-hash": "7c8f6b9d4"}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        # Deployment: ReplicaSet named <deployment>-<pod-template-hash>
        (pod(labels=HASH), "web"),
        # the label wins over everything
        (pod(labels={**HASH, "service.istio.io/workload-name": "shop-web"}), "shop-web"),
        # ReplicaSet whose name does not end with the hash: the ReplicaSet itself
        (pod(labels={"pod-template-hash": "abc"}), "web-7c8f6b9d4"),
        # ReplicaSet without the hash label
        (pod(), "web-7c8f6b9d4"),
        # Argo Rollout
        (
            pod(
                owner=("ReplicaSet", "canary-5d7f9"),
                labels={"rollouts-pod-template-hash": "5d7f9"},
            ),
            "canary",
        ),
        # OpenShift DeploymentConfig
        (
            pod(owner=("ReplicationController", "api-3"), labels={"deploymentconfig": "api"}),
            "api",
        ),
        (pod(owner=("ReplicationController", "api-3")), "api-3"),
        # a CronJob's Job: <cronjob>-<8 to 10 digits>
        (pod(owner=("Job", "backup-29707813")), "backup"),
        (pod(owner=("Job", "backup-2970781312")), "backup"),
        (pod(owner=("Job", "backup-1234567")), "backup-1234567"),
        (pod(owner=("Job", "backup-12345678901")), "backup-12345678901"),
        (pod(owner=("Job", "migrate")), "migrate"),
        # any other controller: its name
        (pod(owner=("StatefulSet", "db")), "db"),
        (pod(owner=("DaemonSet", "agent")), "agent"),
        # an owner that is not the controller
        (pod(controller=False), "web-7c8f6b9d4-x2x7q"),
        # no controller
        (pod(owner=None), "web-7c8f6b9d4-x2x7q"),
        # no generateName (static pod's mirror, owned by its Node): the pod's own name
        (pod(name="etcd-n1", generate="", owner=("Node", "n1")), "etcd-n1"),
    ],
)
def test_workload_name_follows_istio(obj: dict[str, Any], expected: str) -> None:
    """Each of Istio's workload-name rules, and the cases next to them."""
    assert workload_name(obj) == expected


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({}, ("web", "latest")),
        ({"app": "shop", "version": "v2"}, ("shop", "v2")),
        (
            {"app.kubernetes.io/name": "kn", "app": "a", "app.kubernetes.io/version": "1.0"},
            ("kn", "1.0"),
        ),
        (
            {
                "service.istio.io/canonical-name": "cn",
                "app.kubernetes.io/name": "kn",
                "service.istio.io/canonical-revision": "r7",
                "version": "v2",
            },
            ("cn", "r7"),
        ),
        ({"app": "", "version": ""}, ("web", "latest")),
    ],
)
def test_canonical_service_and_revision_by_label_precedence(
    labels: dict[str, str], expected: tuple[str, str]
) -> None:
    """canonical-name > app.kubernetes.io/name > app > workload; revision likewise > latest."""
    assert canonical(pod(labels=labels), "web") == expected


def test_a_pod_becomes_its_istio_identity() -> None:
    """Every field of the identity, from one pod."""
    obj = pod(labels={**HASH, "app": "web", "version": "v1"})
    obj["metadata"]["creationTimestamp"] = "2026-12-01T10:00:00Z"
    obj["spec"]["serviceAccountName"] = "web-sa"
    obj["status"] = {"podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}
    p = parse_pod(obj, NAMING)
    w = p.workload
    assert (w.name, w.workload, w.namespace) == ("web-7c8f6b9d4-x2x7q", "web", "shop")
    assert (w.canonical_service, w.canonical_revision) == ("web", "v1")
    assert w.principal == "spiffe://example.org/ns/shop/sa/web-sa"
    assert w.cluster == "Kubernetes"
    assert w.addresses == (IPv4Address("10.1.0.5"), IPv6Address("fd00::5"))
    assert (p.uid, p.node, p.created) == ("u-1", "n1", 1796119200.0)
    assert (p.host_network, p.terminal) == (False, False)


@pytest.mark.parametrize(
    ("status", "addresses"),
    [
        ({"podIP": "10.1.0.5"}, (IPv4Address("10.1.0.5"),)),  # before podIPs (< 1.16)
        ({}, ()),  # Pending: no address yet
        ({"podIPs": [{"ip": "::ffff:10.1.0.5"}]}, (IPv4Address("10.1.0.5"),)),
        ({"podIPs": [{"ip": "fd00::5"}], "podIP": "fd00::5"}, (IPv6Address("fd00::5"),)),
    ],
)
def test_pod_addresses(status: dict[str, Any], addresses: tuple[object, ...]) -> None:
    """podIPs first, podIP as the fallback, v4-mapped shown as IPv4."""
    obj = pod()
    obj["status"] = status
    assert parse_pod(obj, NAMING).workload.addresses == addresses


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda o: o["metadata"].pop("uid"), "metadata.uid: missing"),
        (lambda o: o["metadata"].pop("namespace"), "metadata.namespace: missing"),
        (lambda o: o["status"].update(podIP="10.1.0.300"), "status.podIP: '10.1.0.300' is not"),
        (lambda o: o["spec"].update(hostNetwork="yes"), "spec.hostNetwork: expected bool, got str"),
        (lambda o: o.update(metadata=[]), "metadata: expected an object, got list"),
        (
            lambda o: o["metadata"].update(creationTimestamp="yesterday"),
            "metadata.creationTimestamp: 'yesterday' is not a time",
        ),
    ],
)
def test_a_malformed_pod_names_the_field(change: Any, problem: str) -> None:
    """Bad data from the API is an error naming the field, never a half-built identity."""
    obj = pod()
    change(obj)
    with pytest.raises(Malformed, match="^" + problem.replace("(", r"\(").replace(")", r"\)")):
        parse_pod(obj, NAMING)


def test_service_account_defaults() -> None:
    """No serviceAccountName: the older serviceAccount field, else "default"."""
    obj = pod()
    assert parse_pod(obj, NAMING).workload.principal == "spiffe://example.org/ns/shop/sa/default"
    obj["spec"]["serviceAccount"] = "legacy"
    assert parse_pod(obj, NAMING).workload.principal == "spiffe://example.org/ns/shop/sa/legacy"


def _items(name: str) -> list[dict[str, Any]]:
    text = (TESTDATA / name).read_text()
    doc = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
    return [i for i in doc["items"] if i]


def test_a_real_kubelet_pod_list() -> None:
    """The minikube 1.35 kubelet capture: workloads, host network and terminal pods as Istio
    would name them."""
    pods = {
        p.workload.name: p
        for p in map(
            lambda o: parse_pod(o, NAMING), _items("kubelet-podlist-nri-minikube-1.35.json")
        )
    }
    named = {n: p.workload.workload for n, p in pods.items()}
    assert named["e2e-hpa-6cd8d99884-tggnr"] == "e2e-hpa"
    assert named["coredns-7d764666f9-qdcxt"] == "coredns"
    assert named["e2e-statefulset-0"] == "e2e-statefulset"
    assert named["kindnet-zkpn8"] == "kindnet"
    assert named["e2e-cronjob-29707813-dhlr2"] == "e2e-cronjob"
    assert named["e2e-failjob-64h4g"] == "e2e-failjob"
    assert named["etcd-datagen-1-35"] == "etcd-datagen-1-35"  # static pod
    assert named["e2e-container-creating"] == "e2e-container-creating"  # naked pod
    ksm = pods["e2e-kube-state-metrics-75b885dc9-97mtr"].workload
    assert (ksm.workload, ksm.canonical_service, ksm.canonical_revision) == (
        "e2e-kube-state-metrics",
        "kube-state-metrics",
        "2.16.0",
    )
    assert ksm.principal == "spiffe://example.org/ns/scraper/sa/e2e-kube-state-metrics"
    assert pods["kindnet-zkpn8"].host_network and pods["e2e-scraper-5f97dc94d8-vkcjl"].host_network
    assert pods["e2e-cronjob-29707813-dhlr2"].terminal and pods["e2e-failjob-64h4g"].terminal
    assert not pods["e2e-statefulset-1"].terminal
    assert len(pods) == 24


def test_mirror_pods_keep_their_names() -> None:
    """The apiserver's mirror pods (owner kind Node, no generateName) are named as the pod."""
    objs = _items("apiserver-list-pods-nri-minikube-1.35.yaml")
    mirrors = [
        o for o in objs if "kubernetes.io/config.mirror" in o["metadata"].get("annotations", {})
    ]
    assert mirrors
    for obj in mirrors:
        assert workload_name(obj) == obj["metadata"]["name"]


def test_a_pod_list_of_2018_without_pod_ips() -> None:
    """A 1.8 kubelet (no podIPs field): the podIP is used; Pending static pods have none."""
    pods = [parse_pod(o, NAMING) for o in _items("kubelet-podlist-datadog-1.8-2.json")]
    assert all(len(p.workload.addresses) <= 1 for p in pods)
    assert any(p.workload.addresses for p in pods)


def test_a_real_service_list() -> None:
    """minikube's Services: cluster IPs and TCP ports; named target ports left to the slices."""
    services = {
        s.name: s
        for s in (
            parse_service(o, NAMING)
            for o in _items("apiserver-list-services-nri-minikube-1.35.yaml")
        )
    }
    dns = services["kube-dns"]
    assert dns.hostname == "kube-dns.kube-system.svc.cluster.local"
    assert dns.addresses == (IPv4Address("10.96.0.10"),)
    assert dns.ports == (ServicePort(53, 53), ServicePort(9153, 9153))  # UDP 53 left out
    assert services["metrics-server"].ports == (ServicePort(443, 0),)  # targetPort "https"


def test_a_dual_stack_service_and_its_slices() -> None:
    """cilium's dual-stack capture: both cluster IPs; an IPv4 and an IPv6 slice."""
    objs = _items("apiserver-list-dualstack-service-endpointslices-cilium-kind-1.27.yaml")
    svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] != "kubernetes")
    service = parse_service(svc, NAMING)
    assert service.addresses == (IPv4Address("10.96.125.19"), IPv6Address("fd00:10:96::14f9"))
    assert [p.port for p in service.ports] == [80]  # the UDP tftp port is left out
    slices = [parse_endpoint_slice(o) for o in objs if o["kind"] == "EndpointSlice"]
    mine = [s for s in slices if s.service == ("default", service.name)]
    v4 = ("10.244.2.62", "10.244.1.69")
    v6 = ("fd00:10:244:2::72d4", "fd00:10:244:1::3c6f")
    assert sorted(s.addresses for s in mine) == sorted(
        [tuple(ip_key(ip_address(a)) for a in v4), tuple(ip_key(ip_address(a)) for a in v6)]
    )
    assert all(s.ports == (80,) for s in mine)


def test_a_terminating_endpoint_stays_in_its_slice() -> None:
    """An endpoint being shut down still carries its service's open connections."""
    objs = _items("apiserver-list-terminating-endpointslice-cilium-kind.yaml")
    (eps,) = [parse_endpoint_slice(o) for o in objs if o["kind"] == "EndpointSlice"]
    assert eps.addresses == (ip_key(ip_address("10.244.0.112")),) and eps.ports


def test_headless_service_has_no_vip() -> None:
    """clusterIP None: no virtual IP to resolve."""
    obj = {
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 5432}]},
    }
    assert parse_service(obj, NAMING).addresses == ()


def service_obj(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "shop"}, "spec": spec}


def slice_obj(**fields: Any) -> dict[str, Any]:
    meta = {"name": "web-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}}
    return {"metadata": meta, **fields}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        # what the cache would pack into another address's key
        (
            lambda o: o["status"].update(podIPs=[{"ip": 167837957}]),
            "status.podIPs[0].ip: expected an IP address string, got int",
        ),
        (
            lambda o: o["status"].update(podIPs=[True]),
            "status.podIPs[0].ip: expected an IP address string, got bool",
        ),
        (
            lambda o: o["status"].update(podIP=167837957),
            "status.podIP: expected str, got int",
        ),
        # strings no label value or log line can carry
        (
            lambda o: o["metadata"].update(labels={"app": "web\ud800"}),
            r"metadata.labels['app']: '\ud800' is not valid UTF-8 (a lone surrogate)",
        ),
        (
            lambda o: o["metadata"].update(labels={"\udfff": "x"}),
            r"metadata.labels: '\udfff' is not valid UTF-8 (a lone surrogate)",
        ),
        (
            lambda o: o["metadata"].update(labels={"app": 7}),
            "metadata.labels['app']: expected str, got int",
        ),
        (
            lambda o: o["metadata"].update(namespace="shop\ud800"),
            r"metadata.namespace: '\ud800' is not valid UTF-8 (a lone surrogate)",
        ),
        (
            lambda o: o["spec"].update(serviceAccountName="\udc80"),
            r"spec.serviceAccountName: '\udc80' is not valid UTF-8 (a lone surrogate)",
        ),
        (
            lambda o: o["metadata"]["ownerReferences"][0].update(name="rs-\ud800"),
            r"name: '\ud800' is not valid UTF-8 (a lone surrogate)",
        ),
        (
            lambda o: o["metadata"].update(ownerReferences=[[]]),
            "metadata.ownerReferences[0]: expected an object, got list",
        ),
        (
            lambda o: o["metadata"].update(creationTimestamp="0001-01-01T00:00:00"),
            "metadata.creationTimestamp: '0001-01-01T00:00:00' is not a time",
        ),
    ],
)
def test_a_pod_whose_values_no_identity_may_hold_is_malformed(change: Any, problem: str) -> None:
    obj = pod(labels=HASH)
    change(obj)
    with pytest.raises(Malformed) as err:
        parse_pod(obj, NAMING)
    assert str(err.value) == problem


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        (service_obj(ports=[{"port": 65616}]), "spec.ports[0].port: 65616 is not a port (1-65535)"),
        (service_obj(ports=[{"port": 0}]), "spec.ports[0].port: 0 is not a port (1-65535)"),
        (
            service_obj(ports=[{"port": True}]),
            "spec.ports[0].port: expected a port number, got bool",
        ),
        (
            service_obj(ports=[{"port": 80.0}]),
            "spec.ports[0].port: expected a port number, got float",
        ),
        (service_obj(ports=[{}]), "spec.ports[0].port: expected a port number, got NoneType"),
        (
            service_obj(ports=[{"port": 80, "targetPort": 70000}]),
            "spec.ports[0].targetPort: 70000 is not a port (1-65535)",
        ),
        (
            service_obj(ports=[{"port": 80, "targetPort": []}]),
            "spec.ports[0].targetPort: expected a port number, got list",
        ),
        (service_obj(ports=["80"]), "spec.ports[0]: expected an object, got str"),
        (
            service_obj(ports=[{"port": 80, "protocol": 6}]),
            "protocol: expected str, got int",
        ),
        (
            service_obj(clusterIPs=[167772161]),
            "spec.clusterIPs[0]: expected an IP address string, got int",
        ),
        (
            service_obj(clusterIPs=[False]),
            "spec.clusterIPs[0]: expected an IP address string, got bool",
        ),
        (
            service_obj(clusterIP="10.96.0.300"),
            "spec.clusterIP[0]: '10.96.0.300' is not an IP address",
        ),
        ({"metadata": [], "spec": {}}, "metadata: expected an object, got list"),
        (
            {"metadata": {"name": "w\ud800", "namespace": "shop"}},
            r"metadata.name: '\ud800' is not valid UTF-8 (a lone surrogate)",
        ),
    ],
)
def test_a_service_whose_values_no_identity_may_hold_is_malformed(obj: Any, problem: str) -> None:
    with pytest.raises(Malformed) as err:
        parse_service(obj, NAMING)
    assert str(err.value) == problem


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        (slice_obj(ports=[{"port": 65616}]), "ports[0].port: 65616 is not a port (1-65535)"),
        (slice_obj(ports=[{"port": -1}]), "ports[0].port: -1 is not a port (1-65535)"),
        (slice_obj(ports=[{"port": False}]), "ports[0].port: expected a port number, got bool"),
        (slice_obj(ports=[7]), "ports[0]: expected an object, got int"),
        (
            slice_obj(endpoints=[{"addresses": [167772161]}]),
            "endpoints[0].addresses[0]: expected an IP address string, got int",
        ),
        (
            slice_obj(endpoints=[{"addresses": [True]}]),
            "endpoints[0].addresses[0]: expected an IP address string, got bool",
        ),
        (slice_obj(endpoints=[{"addresses": "10.1.0.5"}]), "addresses: expected list, got str"),
        ({"metadata": "x"}, "metadata: expected an object, got str"),
    ],
)
def test_an_endpoint_slice_whose_values_no_identity_may_hold_is_malformed(
    obj: Any, problem: str
) -> None:
    with pytest.raises(Malformed) as err:
        parse_endpoint_slice(obj)
    assert str(err.value) == problem


def test_a_slice_port_of_null_means_every_port_and_names_none() -> None:
    obj = slice_obj(endpoints=[{"addresses": ["10.1.0.5"]}], ports=[{"port": None}, {"port": 80}])
    assert parse_endpoint_slice(obj).ports == (80,)


@pytest.mark.parametrize(
    ("key", "obj", "expected"),
    [
        (pod_key, {"metadata": {"uid": "u-1"}}, "u-1"),
        (namespaced_key, {"metadata": {"namespace": "shop", "name": "web"}}, ("shop", "web")),
        (pod_key, {"metadata": []}, "metadata: expected an object, got list"),
        (pod_key, {"metadata": {"uid": 5}}, "metadata.uid: expected str, got int"),
        (pod_key, [], "not an object"),
        (namespaced_key, {"metadata": {"name": "web"}}, "metadata.namespace: missing"),
        (namespaced_key, {"metadata": "x"}, "metadata: expected an object, got str"),
    ],
)
def test_the_key_of_a_deleted_object(key: Any, obj: Any, expected: Any) -> None:
    """A DELETED event needs only the key, but a valid one."""
    if (isinstance(expected, str) and ":" in expected) or expected == "not an object":
        with pytest.raises(Malformed) as err:
            key(obj)
        assert str(err.value) == expected
    else:
        assert key(obj) == expected
