"""End to end with `identity.source = "kubernetes"`: the real daemon and probe, network
namespaces as pods, and a test apiserver and kubelet (HTTPS, tokens) reporting those pods'
IPs. Needs root, like every kernel test."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmeshd.identity.cache import DEFAULT_GRACE_S as GRACE_S
from tests.daemon_proc import DaemonProcess, value
from tests.e2e import (
    CLIENT,
    SERVER,
    SERVICE,
    W,
    attached_probes,
    closed,
    exchange,
    run_plan,
    serve,
    wait_records,
)
from tests.k8s_server import ApiServer, Cluster, FakeKubelet, write_kubeconfig
from tests.netns import Pod, pod_network
from tests.tls import TlsFiles

NODE = "kmeshd-test-node"
CREATED = "2026-12-01T10:00:00Z"


def pod_object(
    workload: str, name: str, template_hash: str, ips: tuple[str, str], **labels: str
) -> dict[str, Any]:
    """A Deployment's pod, as the apiserver shows it."""
    return {
        "metadata": {
            "name": name,
            "generateName": name[: name.rindex("-") + 1],
            "namespace": "default",
            "uid": f"uid-{name}",
            "creationTimestamp": CREATED,
            "labels": {"app": workload, "pod-template-hash": template_hash, **labels},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{workload}-{template_hash}",
                    "uid": f"uid-rs-{workload}",
                    "controller": True,
                }
            ],
        },
        "spec": {"nodeName": NODE, "serviceAccountName": workload},
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]},
    }


def load_pods(cluster: Cluster, pods: dict[str, Pod]) -> None:
    client, server = pods["client"], pods["server"]
    cluster.put("pods", pod_object("sleep", CLIENT, "7c8f6b9d4", (client.ip4, client.ip6)))
    cluster.put(
        "pods",
        pod_object("httpbin", SERVER, "5c5944c58c", (server.ip4, server.ip6), version="v1"),
    )
    cluster.put(
        "services",
        {
            "metadata": {"name": "httpbin", "namespace": "default", "uid": "uid-svc"},
            "spec": {
                "clusterIP": "10.96.0.20",
                "clusterIPs": ["10.96.0.20"],
                "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}],
            },
        },
    )
    cluster.put(
        "endpointslices",
        {
            "metadata": {
                "name": "httpbin-x7k2p",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "httpbin"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [server.ip4], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    )


class K8s:
    def __init__(self, tmp: Path, tls: TlsFiles, pods: dict[str, Pod]) -> None:
        self.cluster = Cluster()
        load_pods(self.cluster, pods)
        self.api = ApiServer(self.cluster, tls)
        self.kubelet = FakeKubelet(NODE, self.cluster, tls=tls)
        self.api.start()
        self.kubelet.start()
        self.kubeconfig = write_kubeconfig(tmp / "kubeconfig", self.api.url, tls)
        self.tls = tls

    def table(self) -> str:
        return (
            f'kubeconfig = "{self.kubeconfig}"\n'
            f'node_name = "{NODE}"\n'
            f'kubelet_url = "{self.kubelet.url}"\n'
            'kubelet_interval = "300ms"\n'
        )

    def close(self) -> None:
        self.api.stop()
        self.kubelet.stop()


@pytest.fixture
def k8s(tmp_path: Path, tls_files: TlsFiles, pods: dict[str, Pod]) -> Iterator[K8s]:
    k = K8s(tmp_path, tls_files, pods)
    yield k
    k.close()


@pytest.fixture
def k8s_daemon(tmp_path: Path, pin_dir: Path, k8s: K8s) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, "", pin_dir, kubernetes=k8s.table())
    d.start()
    yield d
    d.close()


def test_connections_carry_the_identities_the_cluster_reports(
    k8s_daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """292 bytes from the sleep pod to the httpbin pod: workload, canonical names,
    principals and the service (found through its EndpointSlice: named target port "http"
    -> 80) as Istio would label them, in /metrics and in the access log."""
    exchange(pods, [(292, 5, 0)])
    s = k8s_daemon.wait_for(closed(1, source_workload="sleep"), what="the closed connection")
    labels = {
        "source_workload": "sleep",
        "source_canonical_service": "sleep",
        "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "destination_workload": "httpbin",
        "destination_canonical_revision": "v1",
        "destination_principal": "spiffe://cluster.local/ns/default/sa/httpbin",
        "destination_pod_name": SERVER,
        "destination_cluster": "Kubernetes",
    }
    for reporter in ("source", "destination"):
        assert value(s, W + "received_bytes_total", reporter=reporter, **labels) == 292
        assert value(s, W + "sent_bytes_total", reporter=reporter, **labels) == 5
    assert (
        value(
            s,
            "kmesh_tcp_received_bytes_total",
            destination_service=SERVICE,
            source_workload="sleep",
        )
        == 292 * 2
    )
    assert value(s, "kmeshd_identity_source_up", source="apiserver") == 1
    assert value(s, "kmeshd_identity_source_up", source="kubelet") == 1
    records = wait_records(k8s_daemon, 2)
    inbound = next(r for r in records if r["direction"] == "INBOUND")
    assert (inbound["src.workload"], inbound["dst.workload"]) == (CLIENT, SERVER)
    assert inbound["dst.service"] == SERVICE
    assert (inbound["received_bytes"], inbound["sent_bytes"]) == (292, 5)


def test_starts_with_the_apiserver_down_and_keeps_identities_through_faults(
    tmp_path: Path, pin_dir: Path, k8s: K8s, pods: dict[str, Pod]
) -> None:
    """The apiserver unreachable at start: kmeshd is READY anyway, labels from the kubelet,
    and says the apiserver is down. Then the kubelet fails too (500s): metrics go on, and
    the identities it already had still label new connections."""
    k8s.api.stop()
    d = DaemonProcess(tmp_path, "", pin_dir, kubernetes=k8s.table())
    try:
        started = time.monotonic()
        d.start()
        assert time.monotonic() - started < 30
        s = d.samples()
        assert value(s, "kmeshd_identity_source_up", source="apiserver") == 0
        assert value(s, "kmeshd_identity_source_up", source="kubelet") == 1
        exchange(pods, [(100, 7, 0)])
        d.wait_for(closed(1, source_workload="sleep", destination_workload="httpbin"))
        k8s.kubelet.fail("/pods", 500, times=100000)
        d.wait_for(lambda s: value(s, "kmeshd_identity_source_up", source="kubelet") == 0)
        exchange(pods, [(200, 9, 0)])
        s = d.wait_for(closed(2, source_workload="sleep", destination_workload="httpbin"))
        assert (
            value(s, W + "received_bytes_total", reporter="destination", source_workload="sleep")
            == 300
        )
        assert "apiserver pods: GET https://127.0.0.1:" in d.stderr()
        assert "cannot connect" in d.stderr() and "kubelet pods: GET" in d.stderr()
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.close()


def test_a_stop_signal_while_waiting_for_silent_sources_exits_at_once(
    tmp_path: Path, pin_dir: Path, tls_files: TlsFiles
) -> None:
    """An apiserver and a kubelet that accept connections but never answer keep start-up
    waiting (up to a minute); SIGTERM meanwhile ends it within seconds, exit 0, the
    program detached."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the handshakes; nothing ever reads
    url = f"https://127.0.0.1:{silent.getsockname()[1]}"
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url, tls_files)
    table = f'kubeconfig = "{kubeconfig}"\nnode_name = "{NODE}"\nkubelet_url = "{url}"\n'
    before = attached_probes()
    d = DaemonProcess(tmp_path, "", pin_dir, kubernetes=table)
    try:
        d.start(until="STATUS=waiting for the identity sources")
        time.sleep(1)  # well into the wait
        assert attached_probes() == before + 1
        started = time.monotonic()
        assert d.stop(signal.SIGTERM, timeout=30) == 0
        assert time.monotonic() - started < 3
        assert attached_probes() == before
    finally:
        d.close()
        silent.close()


def test_the_series_of_a_deleted_pod_leave_after_its_grace_and_series_ttl(
    tmp_path: Path, pin_dir: Path, tls_files: TlsFiles
) -> None:
    """The sleep pod deleted from the cluster (apiserver and kubelet): the label sets that
    name it leave /metrics and the textfile once the cache's grace period (120 s, for
    closes that come after the deletion) and series_ttl have passed; those of another
    client pod stay with their counts. Takes about two minutes."""
    with pod_network(["client", "server", "other"], subnet=78) as network:
        k = K8s(tmp_path, tls_files, network)
        other = network["other"]
        k.cluster.put(
            "pods", pod_object("curl", "curl-6d4b7c8f9-q2w3e", "6d4b7c8f9", (other.ip4, other.ip6))
        )
        d = DaemonProcess(
            tmp_path,
            "",
            pin_dir,
            kubernetes=k.table(),
            interval="500ms",
            metrics='series_ttl = "2s"',
        )
        try:
            d.start()
            server = serve(network["server"], 2)
            run_plan(network["client"], network["server"].ip4, [(292, 5, 0)])
            run_plan(other, network["server"].ip4, [(100, 7, 0)])
            assert server.wait(timeout=30) == 0
            d.wait_for(closed(1, source_workload="sleep"), what="sleep's connection")
            d.wait_for(closed(1, source_workload="curl"), what="curl's connection")
            k.cluster.delete("pods", "default", CLIENT)
            deleted = time.monotonic()
            after = d.wait_for(
                lambda s: value(s, W + "connections_opened_total", source_workload="sleep") == 0,
                timeout=GRACE_S + 30,
                what="the deleted pod's series gone",
            )
            took = time.monotonic() - deleted
            assert GRACE_S <= took <= GRACE_S + 2 + 0.5 + 3  # grace + ttl + interval (+ polls)
            for reporter in ("source", "destination"):
                curl = {"reporter": reporter, "source_workload": "curl"}
                assert value(after, W + "received_bytes_total", **curl) == 100
                assert value(after, W + "sent_bytes_total", **curl) == 7
                assert value(after, W + "connections_closed_total", **curl) == 1
            assert value(after, "kmeshd_series_expired_total") == 4  # 2 reporters x 2 levels
            textfile = d.textfile.read_text()
            assert 'source_workload="sleep"' not in textfile
            assert 'source_workload="curl"' in textfile
        finally:
            d.close()
            k.close()
