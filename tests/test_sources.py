"""kmeshd.identity.sources: the Kubernetes source as the daemon uses it, against a test
apiserver and kubelet over HTTPS: sync, lookups, and keeping the last good state through
every fault."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from kmeshd.config import Config, IdentityConfig, KubernetesConfig
from kmeshd.errors import ConfigError
from kmeshd.export.metrics import Health, health_text
from kmeshd.identity.sources import KubernetesSource, open_source
from tests.k8s_server import (
    ApiServer,
    Cluster,
    FakeKubelet,
    synthetic_pod_ip,
    synthetic_service_ip,
    write_kubeconfig,
)
from tests.tls import TlsFiles

NODE = "node-1"


class Setup:
    def __init__(self, tmp: Path, tls: TlsFiles) -> None:
        self.cluster = Cluster()
        # 60 pods of 6 services over 3 nodes: node-1 has pods 1, 4, 7, ...
        self.cluster.load_synthetic(pods=60, services=6, nodes=3)
        self.api = ApiServer(self.cluster, tls)
        self.kubelet = FakeKubelet(NODE, self.cluster, tls=tls)
        self.tmp, self.tls = tmp, tls

    def config(self) -> KubernetesConfig:
        kubeconfig = write_kubeconfig(self.tmp / "kubeconfig", self.api.url, self.tls)
        return KubernetesConfig(
            kubeconfig=str(kubeconfig),
            node_name=NODE,
            kubelet_url=self.kubelet.url,
            kubelet_interval=0.2,
        )

    def source(self) -> KubernetesSource:
        source = KubernetesSource(self.config(), env={})
        source.start()
        return source


@pytest.fixture
def setup(tmp_path: Path, tls_files: TlsFiles) -> Iterator[Setup]:
    s = Setup(tmp_path, tls_files)
    s.api.start()
    s.kubelet.start()
    yield s
    s.api.stop()
    s.kubelet.stop()


def until(source: KubernetesSource, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        source.refresh(time.monotonic())
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {source.status()}")


def pod_name(source: KubernetesSource, i: int) -> str | None:
    w = source.view().workload_at(ip_address(synthetic_pod_ip(i)))
    return w.name if w else None


def test_synced_from_both_sources_answers_every_lookup(setup: Setup) -> None:
    """Pods anywhere in the cluster by IP; a service by cluster IP and port, and by pod
    IP and target port; this node's pods and every cluster IP are the known set."""
    source = setup.source()
    try:
        source.wait_synced(10, lambda: None)
        assert source.up() == {"apiserver": True, "kubelet": True}
        view = source.view()
        assert pod_name(source, 0) == "svc-0-0"
        assert pod_name(source, 59) == "svc-5-59"
        svc = view.service_at(ip_address(synthetic_service_ip(2)), 80)
        assert svc is not None and svc.hostname == "svc-2.ns-2.svc.cluster.local"
        behind = view.service_behind(ip_address(synthetic_pod_ip(8)), 8080)
        assert behind is not None and behind.name == "svc-2"
        local = {ip_address(synthetic_pod_ip(i)) for i in range(1, 60, 3)}
        vips = {ip_address(synthetic_service_ip(s)) for s in range(6)}
        assert view.known_addresses() == frozenset(local | vips)
    finally:
        source.close()


def test_apiserver_down_at_start(setup: Setup) -> None:
    """Start with the apiserver unreachable: the kubelet's pods resolve, the status and
    source_up say what is missing; when the apiserver comes back, the rest arrives."""
    setup.api.stop()
    source = setup.source()
    try:
        started = time.monotonic()
        source.wait_synced(30, lambda: None)
        assert time.monotonic() - started < 5
        until(source, lambda: pod_name(source, 1) == "svc-1-1")
        assert source.up() == {"apiserver": False, "kubelet": True}
        assert "apiserver pods down: GET https://127.0.0.1:" in source.status()
        assert "cannot connect" in source.status()
        assert pod_name(source, 0) is None  # another node's pod: only the apiserver knows
        setup.api.start()
        until(source, lambda: source.up()["apiserver"] and pod_name(source, 0) == "svc-0-0")
    finally:
        source.close()


def test_kubelet_down_at_start(setup: Setup) -> None:
    """The apiserver alone is enough; the kubelet is reported down until it answers."""
    setup.kubelet.stop()
    source = setup.source()
    try:
        source.wait_synced(30, lambda: None)
        assert source.up() == {"apiserver": True, "kubelet": False}
        assert pod_name(source, 1) == "svc-1-1"
        setup.kubelet.start()
        until(source, lambda: source.up()["kubelet"])
    finally:
        source.close()


def kill(setup: Setup) -> None:
    setup.api.stop()
    setup.kubelet.stop()


def server_errors(setup: Setup) -> None:
    for server in (setup.api, setup.kubelet):
        for path in ("/api/v1/pods", "/api/v1/services", "/apis/", "/pods"):
            server.fail(path, 500, times=1000)
    setup.api.watch_lifetime(0.2)


def garbage(setup: Setup) -> None:
    for server in (setup.api, setup.kubelet):
        for path in ("/api/v1/pods", "/api/v1/services", "/apis/", "/pods"):
            server.garbage(path, times=1000)
    setup.api.watch_lifetime(0.2)


def truncated(setup: Setup) -> None:
    for server in (setup.api, setup.kubelet):
        for path in ("/api/v1/pods", "/api/v1/services", "/apis/", "/pods"):
            server.truncate(path, times=1000)
    setup.api.watch_lifetime(0.2)


def token_expired(setup: Setup) -> None:
    setup.api.token = setup.kubelet.token = "rotated-and-not-ours"
    setup.api.watch_lifetime(0.2)


def wrong_ca(setup: Setup) -> None:
    for server in (setup.api, setup.kubelet):
        server.use_wrong_ca(True)
        server.stop()  # open (kept-alive) connections keep the certificate they had
        server.start()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (kill, "cannot connect"),
        (server_errors, "HTTP 500"),
        (garbage, "not JSON"),
        (truncated, ""),
        (token_expired, "401 Unauthorized"),
        (wrong_ca, "TLS failed"),
    ],
)
def test_a_fault_later_keeps_every_identity_and_says_so(
    setup: Setup, fault: Callable[[Setup], None], reason: str
) -> None:
    """After a good sync, each fault: both sources report down (with the reason), every
    identity still resolves, and nothing is dropped while the fault lasts."""
    source = setup.source()
    try:
        source.wait_synced(10, lambda: None)
        known = source.view().known_addresses()
        fault(setup)
        time.sleep(0.6)  # the watches opened before the fault have ended
        changed = setup.cluster.get("pods", "ns-0", "svc-0-0")
        assert changed is not None
        changed["metadata"]["labels"] = {"version": "v2"}
        setup.cluster.put("pods", changed)  # an event for the watch to (fail to) carry
        until(source, lambda: source.up() == {"apiserver": False, "kubelet": False})
        time.sleep(1.0)
        source.refresh(time.monotonic() + 3600)  # even an hour on: nothing is dead
        assert reason in source.status()
        assert pod_name(source, 0) == "svc-0-0" and pod_name(source, 1) == "svc-1-1"
        assert source.view().known_addresses() == known
        assert source.cache.counts() == {"pods": 60, "services": 6, "endpointslices": 6}
    finally:
        source.close()


def test_a_watch_that_closes_every_few_seconds_still_delivers_every_change(setup: Setup) -> None:
    """Watches cut every 0.5 s while pods come and go: the cache follows, the source stays
    up, and the apiserver sees one list per resource."""
    source = setup.source()
    try:
        source.wait_synced(10, lambda: None)
        setup.api.watch_lifetime(0.5)
        pod = setup.cluster.get("pods", "ns-0", "svc-0-0")
        assert pod is not None
        for i in range(5):
            pod["metadata"]["name"] = f"extra-{i}"
            pod["metadata"]["uid"] = f"extra-uid-{i}"
            pod["status"]["podIP"] = pod["status"]["podIPs"][0]["ip"] = f"10.250.0.{i}"
            setup.cluster.put("pods", pod)
            time.sleep(0.4)
        until(source, lambda: source.cache.counts()["pods"] == 65)
        assert source.up()["apiserver"]
        lists = [r for r in setup.api.log if not r.query.get("watch")]
        assert len(lists) == 3
    finally:
        source.close()


def test_bad_credentials_are_a_config_error_naming_the_file(tmp_path: Path) -> None:
    """A kubeconfig that does not exist: exit-78 material, with the config file's name."""
    config = Config(
        path=tmp_path / "kmeshd.toml",
        identity=IdentityConfig(source="kubernetes"),
        kubernetes=KubernetesConfig(kubeconfig=str(tmp_path / "missing")),
    )
    with pytest.raises(ConfigError) as err:
        open_source(config)
    assert err.value.problems == [
        f"{tmp_path}/missing: cannot read: No such file or directory"
        f" (named by kubernetes.kubeconfig in {tmp_path}/kmeshd.toml)"
    ]


def test_rejected_objects_are_counted_per_source_and_resource(setup: Setup) -> None:
    """0 for every synced resource from the start; a pod that is not valid counts at the
    apiserver (listed) and at the kubelet (polled), and reaches the metric."""
    source = setup.source()
    try:
        source.wait_synced(10, lambda: None)
        assert source.rejected() == {
            ("apiserver", "pods"): 0,
            ("apiserver", "services"): 0,
            ("apiserver", "endpointslices"): 0,
            ("kubelet", "pods"): 0,
        }
        bad = setup.cluster.get("pods", "ns-1", "svc-1-1")
        assert bad is not None
        bad["metadata"]["name"] = "bad"
        bad["spec"]["serviceAccountName"] = "\ud800"
        setup.cluster.put("pods", bad)
        until(source, lambda: source.rejected()[("kubelet", "pods")] >= 1)
        until(source, lambda: source.rejected()[("apiserver", "pods")] == 1)
        up = source.up()
        assert up == {"apiserver": True, "kubelet": True}
        text = health_text(Health(objects_rejected=source.rejected()))
        assert (
            'kmeshd_identity_objects_rejected_total{resource="pods",source="apiserver"} 1.0' in text
        )
        assert (
            'kmeshd_identity_objects_rejected_total{resource="services",source="apiserver"} 0.0'
            in text
        )
        assert source.cache.counts()["pods"] == 60
    finally:
        source.close()


def test_a_token_no_header_can_carry_is_each_threads_error_not_their_end(
    setup: Setup,
) -> None:
    """A newline inside the token: every apiserver resource reports it, and once the token
    is good again (a rotation) everything syncs."""
    source = setup.source()
    try:
        source.wait_synced(10, lambda: None)
        assert source._api.creds.token is not None
        source._api.creds.token._token = "test\ntoken"
        setup.api.watch_lifetime(0.1)
        until(source, lambda: not source.up()["apiserver"])
        apiserver = [k for k in source.states if k[0] == "apiserver"]
        until(source, lambda: all("bearer token" in (source.states[k] or "") for k in apiserver))
        setup.api.watch_lifetime(None)
        source._api.creds.token._token = "test-token"

        def synced() -> bool:
            setup.cluster.bookmark()  # a watch is in sync once an event came through
            return source.up()["apiserver"]

        until(source, synced, timeout=40)
    finally:
        source.close()
