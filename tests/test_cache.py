"""kmeshd.identity.cache: merging sources, dying slowly, and who wins an address."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from kmeshd.identity.cache import APISERVER, KUBELET, PODS, SERVICES, SLICES, IdentityCache
from kmeshd.identity.model import Service, ServicePort, Workload, ip_key
from kmeshd.identity.objects import Endpoints, Pod

IP = IPv4Address("10.1.0.5")
GRACE = 60.0


def pod(
    uid: str,
    name: str = "",
    ip: str = "10.1.0.5",
    created: float = 100.0,
    node: str = "n1",
    host_network: bool = False,
    terminal: bool = False,
) -> Pod:
    workload = Workload(
        name=name or uid,
        workload=name or uid,
        namespace="shop",
        canonical_service="web",
        canonical_revision="latest",
        principal="spiffe://cluster.local/ns/shop/sa/default",
        cluster="Kubernetes",
        addresses=(IPv4Address(ip),) if ip else (),
    )
    return Pod(uid, node, created, host_network, terminal, workload)


def service(name: str, vip: str = "10.96.0.20", namespace: str = "shop") -> Service:
    return Service(
        name=name,
        namespace=namespace,
        hostname=f"{name}.{namespace}.svc.cluster.local",
        addresses=(IPv4Address(vip),),
        ports=(ServicePort(80, 8080),),
    )


def slice_of(
    svc: str, name: str = "", ips: tuple[str, ...] = ("10.1.0.5",), namespace: str = "shop"
) -> Endpoints:
    keys = tuple(ip_key(IPv4Address(ip)) for ip in ips)
    return Endpoints(namespace, name or f"{svc}-abcde", (namespace, svc), keys, (8080,))


def name_at(cache: IdentityCache, ip: IPv4Address = IP) -> str | None:
    w = cache.workload_at(ip)
    return w.name if w else None


def test_a_reused_address_belongs_to_the_newest_pod() -> None:
    """Two live pods reporting one IP (a stale object and its successor): the newer wins,
    whatever order they arrive in."""
    for order in (
        [pod("old", created=1), pod("new", created=2)],
        [pod("new", created=2), pod("old", created=1)],
    ):
        cache = IdentityCache("n1", GRACE)
        for p in order:
            cache.put(PODS, APISERVER, p, now=0)
        assert name_at(cache) == "new"


def test_a_deleted_pod_answers_for_its_address_during_the_grace_period() -> None:
    """Connections close after their pod is gone: the identity outlives the pod by `grace`."""
    cache = IdentityCache("n1", GRACE)
    cache.put(PODS, APISERVER, pod("a"), now=0)
    cache.delete(PODS, APISERVER, "a", now=10)
    assert cache.gc(now=10 + GRACE - 1) == 0
    assert name_at(cache) == "a"
    assert cache.gc(now=10 + GRACE) == 1
    assert name_at(cache) is None


def test_a_live_pod_beats_a_dead_one_even_an_older_live_one() -> None:
    """A deleted pod's IP reused by a new pod resolves to the new pod at once."""
    cache = IdentityCache("n1", GRACE)
    cache.put(PODS, APISERVER, pod("gone", created=50), now=0)
    cache.put(PODS, APISERVER, pod("alive", created=10), now=0)
    assert name_at(cache) == "gone"  # both live: the newest
    cache.delete(PODS, APISERVER, "gone", now=1)
    assert name_at(cache) == "alive"


def test_a_finished_pod_is_dead_from_when_it_is_seen_finished() -> None:
    """Succeeded/Failed pods keep reporting their IP; a running pod with it wins, and alone
    the finished one answers only for the grace period."""
    cache = IdentityCache("n1", GRACE)
    cache.put(PODS, APISERVER, pod("job", created=90, terminal=True), now=5)
    assert name_at(cache) == "job"
    cache.put(PODS, APISERVER, pod("job", created=90, terminal=True), now=30)  # seen again
    assert cache.gc(now=5 + GRACE) == 1  # the grace period runs from the first sighting
    cache.put(PODS, APISERVER, pod("job2", created=90, terminal=True), now=100)
    cache.put(PODS, APISERVER, pod("web", created=10), now=100)
    assert name_at(cache) == "web"


def test_host_network_pods_never_claim_the_node_address() -> None:
    """Every hostNetwork pod reports the node IP: none of them is its identity."""
    cache = IdentityCache("n1", GRACE)
    cache.put(PODS, KUBELET, pod("kube-proxy", ip="192.168.67.2", host_network=True), now=0)
    cache.put(PODS, KUBELET, pod("ingress", ip="192.168.67.2", host_network=True), now=0)
    assert cache.workload_at(IPv4Address("192.168.67.2")) is None
    assert cache.known_addresses() == frozenset()


def test_a_pod_lives_while_any_source_reports_it() -> None:
    """The kubelet dropping a pod the apiserver still has (or the reverse) keeps it alive;
    it dies when the last source lets go."""
    cache = IdentityCache("n1", GRACE)
    cache.replace(PODS, KUBELET, [pod("a")], now=0)
    cache.replace(PODS, APISERVER, [pod("a")], now=0)
    cache.replace(PODS, KUBELET, [], now=1)
    assert cache.gc(now=1000) == 0 and name_at(cache) == "a"
    cache.delete(PODS, APISERVER, "a", now=1000)
    assert name_at(cache) == "a"  # dead, in its grace period
    assert cache.gc(now=1000 + GRACE) == 1 and name_at(cache) is None


def test_a_pod_reported_again_comes_back_to_life() -> None:
    """A relist that still has a pod the last list missed: alive, no grace period running."""
    cache = IdentityCache("n1", GRACE)
    cache.replace(PODS, APISERVER, [pod("a")], now=0)
    cache.replace(PODS, APISERVER, [], now=1)
    cache.replace(PODS, APISERVER, [pod("a")], now=2)
    assert cache.gc(now=1 + GRACE) == 0 and name_at(cache) == "a"


def test_a_pod_whose_address_changed_releases_the_old_one() -> None:
    """A MODIFIED pod with a new IP: the old IP is free at once (the pod is alive elsewhere)."""
    cache = IdentityCache("n1", GRACE)
    cache.put(PODS, APISERVER, pod("a", ip=""), now=0)  # Pending, no IP yet
    assert cache.known_addresses() == frozenset()
    cache.put(PODS, APISERVER, pod("a", ip="10.1.0.5"), now=1)
    cache.put(PODS, APISERVER, pod("a", ip="10.1.0.6"), now=2)
    assert name_at(cache) is None and name_at(cache, IPv4Address("10.1.0.6")) == "a"


def test_services_by_vip_and_by_endpoint() -> None:
    """VIP:port -> the service; pod IP:target port -> the service whose slice lists it."""
    cache = IdentityCache("n1", GRACE)
    cache.put(SERVICES, APISERVER, service("web"), now=0)
    cache.put(SLICES, APISERVER, slice_of("web"), now=0)
    web = cache.service_at(IPv4Address("10.96.0.20"), 80)
    assert web is not None and web.name == "web"
    assert cache.service_at(IPv4Address("10.96.0.20"), 8080) is None
    assert cache.service_behind(IP, 8080) == web
    assert cache.service_behind(IP, 80) is None
    assert cache.service_at(IPv6Address("::ffff:10.96.0.20"), 80) == web


def test_several_services_for_one_endpoint_pick_the_first_by_namespace_and_name() -> None:
    """Two services select one pod port: the choice is fixed, never arrival order."""
    for order in (("zeta", "alpha"), ("alpha", "zeta")):
        cache = IdentityCache("n1", GRACE)
        for i, name in enumerate(order):
            cache.put(SERVICES, APISERVER, service(name, vip=f"10.96.0.{20 + i}"), now=0)
            cache.put(SLICES, APISERVER, slice_of(name), now=0)
        behind = cache.service_behind(IP, 8080)
        assert behind is not None and behind.name == "alpha"


def test_a_slice_whose_service_is_unknown_names_no_service() -> None:
    """A slice can arrive before its Service: no service until the Service is known."""
    cache = IdentityCache("n1", GRACE)
    cache.put(SLICES, APISERVER, slice_of("web"), now=0)
    assert cache.service_behind(IP, 8080) is None
    cache.put(SERVICES, APISERVER, service("web"), now=0)
    assert cache.service_behind(IP, 8080) is not None


def test_deleted_services_and_slices_die_slowly_too() -> None:
    """A scaled-down service's last connections still resolve during the grace period."""
    cache = IdentityCache("n1", GRACE)
    cache.replace(SERVICES, APISERVER, [service("web")], now=0)
    cache.replace(SLICES, APISERVER, [slice_of("web")], now=0)
    cache.delete(SLICES, APISERVER, ("shop", "web-abcde"), now=10)
    cache.delete(SERVICES, APISERVER, ("shop", "web"), now=10)
    assert cache.service_behind(IP, 8080) is not None
    assert cache.service_at(IPv4Address("10.96.0.20"), 80) is not None
    assert cache.gc(now=10 + GRACE) == 2
    assert cache.service_at(IPv4Address("10.96.0.20"), 80) is None


def test_known_addresses_are_this_nodes_pods_and_every_cluster_ip() -> None:
    """The kernel tracks sockets of local pods and of service VIPs; remote pods are only
    resolved. A pod the kubelet reports is local whatever its node name says."""
    cache = IdentityCache("n1", GRACE)
    cache.put(PODS, APISERVER, pod("local", ip="10.1.0.5", node="n1"), now=0)
    cache.put(PODS, APISERVER, pod("remote", ip="10.2.0.5", node="n2"), now=0)
    cache.put(PODS, KUBELET, pod("static", ip="10.1.0.9", node="renamed"), now=0)
    cache.put(SERVICES, APISERVER, service("web"), now=0)
    assert cache.known_addresses() == frozenset(
        map(IPv4Address, ["10.1.0.5", "10.1.0.9", "10.96.0.20"])
    )
    assert name_at(cache, IPv4Address("10.2.0.5")) == "remote"


def test_known_version_moves_when_addresses_do_not_when_labels_do() -> None:
    """The daemon recomputes the kernel's known set only when the version moved: a new
    address, a source starting to report a pod, an entry forgotten; not a label change."""
    cache = IdentityCache("n1", GRACE)
    v0 = cache.known_version
    cache.put(PODS, APISERVER, pod("a"), now=0)
    v1 = cache.known_version
    relabelled = pod("a", created=100.0)
    cache.put(PODS, APISERVER, relabelled, now=1)
    assert v0 < v1 == cache.known_version
    cache.put(PODS, KUBELET, relabelled, now=2)
    v2 = cache.known_version
    cache.put(PODS, APISERVER, pod("a", ip="10.1.0.6"), now=3)
    v3 = cache.known_version
    cache.delete(PODS, APISERVER, "a", now=4)
    cache.delete(PODS, KUBELET, "a", now=4)
    assert v1 < v2 < v3 == cache.known_version  # death changes no claim
    cache.gc(now=4 + GRACE)
    assert cache.known_version > v3
    assert cache.counts() == {"pods": 0, "services": 0, "endpointslices": 0}


def test_a_changed_pod_answers_with_its_new_identity_at_once() -> None:
    """An update that keeps the address (a new label, say) is answered at once, also for
    an address with several claimants."""
    cache = IdentityCache("n1", GRACE)
    cache.put(PODS, APISERVER, pod("a", created=10), now=0)
    cache.put(PODS, APISERVER, pod("b", created=5), now=0)  # an older rival for the IP
    renamed = pod("a", created=10)
    renamed = Pod(renamed.uid, "n1", 10, False, False, replace(renamed.workload, workload="v2"))
    cache.put(PODS, APISERVER, renamed, now=1)
    w = cache.workload_at(IP)
    assert w is not None and w.workload == "v2"
    cache.delete(PODS, APISERVER, "a", now=2)
    assert name_at(cache) == "b"


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("10.1.0.5", 0x0A010005),
        ("0.0.0.0", 0),
        ("::ffff:10.1.0.5", 0x0A010005),  # v4-mapped: the IPv4 address's key
        ("::a01:5", 0x0A010005 | 1 << 128),  # IPv6 whose low bits match: tagged apart
        ("fd00::1", 0xFD00 << 112 | 1 | 1 << 128),
    ],
)
def test_ip_key(address: str, key: int) -> None:
    assert ip_key(ip_address(address)) == key


def test_a_name_is_known_while_any_pod_answers_to_it_dead_ones_included() -> None:
    """A workload is known while one of its pods is in the cache, a deleted pod until the
    grace period ends; a deleted service likewise. What metric series leave by."""
    cache = IdentityCache("n1", GRACE)
    first, second = (
        replace(p, workload=replace(p.workload, workload="web"))
        for p in (pod("a", name="web-1"), pod("b", name="web-2", ip="10.1.0.6"))
    )
    workload = ("workload", *first.workload.label_values())
    cache.put(PODS, APISERVER, first, now=0)
    cache.put(PODS, APISERVER, second, now=0)
    assert workload == ("workload", *second.workload.label_values())
    assert cache.knows(workload) and cache.knows(("pod", "shop", "web-1"))
    cache.delete(PODS, APISERVER, "a", now=10)
    cache.gc(now=10 + GRACE)
    assert not cache.knows(("pod", "shop", "web-1")) and cache.knows(workload)
    cache.delete(PODS, APISERVER, "b", now=20)
    assert cache.knows(workload)  # dead, within its grace
    cache.gc(now=20 + GRACE)
    assert not cache.knows(workload)
    cache.replace(SERVICES, APISERVER, [service("web")], now=0)
    assert cache.knows(("service", "shop", "web"))
    cache.replace(SERVICES, APISERVER, [], now=30)
    cache.gc(now=30 + GRACE)
    assert not cache.knows(("service", "shop", "web"))


def test_a_relabelled_pod_answers_to_its_new_name_only() -> None:
    """A pod whose labels changed (a new revision) is known by its new identity, not by
    the old one, which no other pod holds."""
    cache = IdentityCache("n1", GRACE)
    before = pod("a", name="web-1")
    after = replace(before, workload=replace(before.workload, canonical_revision="v2"))
    cache.put(PODS, APISERVER, before, now=0)
    cache.put(PODS, APISERVER, after, now=1)
    assert cache.knows(("workload", *after.workload.label_values()))
    assert not cache.knows(("workload", *before.workload.label_values()))


def test_a_port_past_16_bits_never_names_another_address() -> None:
    """Port 65616 at 10.96.0.20 would be port 80 at 10.96.0.21 in the packed key: the
    parsers reject it, and the cache does not index it either."""
    cache = IdentityCache("n1")
    wide = replace(service("wide"), ports=(ServicePort(65616, 8080),))
    cache.put(SERVICES, APISERVER, wide, 0.0)
    cache.put(SLICES, APISERVER, replace(slice_of("wide"), ports=(65616,)), 0.0)
    cache.put(PODS, APISERVER, pod("u-1", ip="10.1.0.6"), 0.0)
    assert cache.service_at(IPv4Address("10.96.0.21"), 80) is None
    assert cache.service_at(IPv4Address("10.96.0.20"), 65616 & 0xFFFF) is None
    assert cache.service_behind(IPv4Address("10.1.0.6"), 80) is None
