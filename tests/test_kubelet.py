"""kmeshd.identity.kubelet: `GET /pods` from a test kubelet serving real captured bodies."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from kmeshd.backoff import Backoff
from kmeshd.identity import kubelet
from kmeshd.identity.cache import KUBELET, PODS
from kmeshd.identity.client import ApiError, Client
from kmeshd.identity.credentials import Credentials, TokenSource
from kmeshd.identity.kubelet import Poller, pods_of
from kmeshd.identity.objects import Naming
from kmeshd.identity.updates import Listed, Rejected, SourceState, Update
from tests.k8s_server import TESTDATA, Cluster, FakeKubelet
from tests.tls import TlsFiles

NAMING = Naming()


def captured(name: str) -> bytes:
    return (TESTDATA / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("kubelet-podlist-nri-minikube-1.35.json", 24),
        ("kubelet-podlist-nri-minikube-1.20.json", 27),
        ("kubelet-podlist-honeycomb-baremetal-calico-metallb-1.18.json", 11),
        ("kubelet-podlist-datadog-1.8-2.json", 7),
        ("kubelet-podlist-datadog-gke-statefulset-pvc.json", 9),
        ("kubelet-podlist-datadog-1.10-container-not-ready.json", 5),
        ("kubelet-podlist-datadog-items-null.json", 0),  # a kubelet starting up
        ("kubelet-podlist-datadog-null-and-empty-items.json", 1),  # [null, pod, {}]
    ],
)
def test_every_captured_kubelet_body_parses(name: str, count: int) -> None:
    """Eight real kubelets, 2018 to 2026, quirks included: every pod, no problem."""
    pods, problems = pods_of(json.loads(captured(name)), NAMING)
    assert (len(pods), problems) == (count, [])


def test_a_bad_pod_is_skipped_and_named_not_the_list() -> None:
    """One pod with a bad IP costs that pod only."""
    body = json.loads(captured("kubelet-podlist-nri-minikube-1.35.json"))
    body["items"][3]["status"]["podIP"] = "10.0.0.999"
    body["items"][3]["status"]["podIPs"] = [{"ip": "10.0.0.999"}]
    pods, problems = pods_of(body, NAMING)
    assert len(pods) == 23
    assert problems == ["items[3]: status.podIPs[0].ip: '10.0.0.999' is not an IP address"]


@pytest.mark.parametrize(
    "body", [[], {"kind": "Status", "code": 500}, {"kind": "PodList", "items": {"a": 1}}]
)
def test_a_body_that_is_not_a_pod_list_is_an_error(body: object) -> None:
    with pytest.raises(ApiError):
        pods_of(body, NAMING)


class Polling:
    def __init__(self, kubelet: FakeKubelet, creds: Credentials, interval: float = 0.2) -> None:
        self.out: queue.Queue[Update] = queue.Queue()
        self.stop = threading.Event()
        client = Client(creds, kubelet.url)
        self.poller = Poller(client, NAMING, interval, self.out, self.stop, Backoff(0.05, 0.2))
        self.thread = threading.Thread(target=self.poller.run, daemon=True)
        self.messages: list[Update] = []

    def __enter__(self) -> Polling:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def until(self, count: int, kind: type = Listed, timeout: float = 10.0) -> list[Update]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while not self.out.empty():
                self.messages.append(self.out.get())
            if len([m for m in self.messages if isinstance(m, kind)]) >= count:
                return [m for m in self.messages if isinstance(m, kind)]
            time.sleep(0.02)
        raise AssertionError(f"fewer than {count} {kind.__name__}: {self.messages[-4:]}")


def test_polls_over_https_with_a_token(tls_files: TlsFiles) -> None:
    """HTTPS, the CA, a bearer token: the node's pods, every interval, each a whole list."""
    body = captured("kubelet-podlist-nri-minikube-1.35.json")
    with FakeKubelet(body=body, tls=tls_files) as kubelet:
        creds = Credentials(kubelet.url, ca_file=tls_files.ca_cert, token=TokenSource("test-token"))
        with Polling(kubelet, creds) as polling:
            lists = polling.until(2)
    assert all(isinstance(m, Listed) and m.source == KUBELET and m.resource == PODS for m in lists)
    assert [len(m.values) for m in lists[:2]] == [24, 24]  # type: ignore[union-attr]
    assert [r.path for r in kubelet.log][:2] == ["/pods", "/pods"]


def test_the_read_only_port_needs_no_credentials() -> None:
    """http:// (port 10255 where enabled): no TLS, no token sent."""
    cluster = Cluster()
    cluster.load_synthetic(pods=30, services=3, nodes=3)
    with FakeKubelet(node_name="node-1", cluster=cluster) as kubelet:
        polling = Polling(kubelet, Credentials(kubelet.url))
        with polling:
            (first,) = polling.until(1)
    assert isinstance(first, Listed)
    assert {p.node for p in first.values} == {"node-1"} and len(first.values) == 10


def test_a_refused_token_sends_no_list_and_says_why(tls_files: TlsFiles) -> None:
    """401s: no Listed (the cache keeps what it had), a SourceState naming the refusal;
    once the kubelet accepts the token, the list arrives."""
    body = captured("kubelet-podlist-nri-minikube-1.35.json")
    with FakeKubelet(body=body, tls=tls_files) as kubelet:
        creds = Credentials(kubelet.url, ca_file=tls_files.ca_cert, token=TokenSource("other"))
        with Polling(kubelet, creds) as polling:
            polling.until(2, SourceState)
            kubelet.token = "other"
            polling.until(1, Listed)
    first_listed = next(i for i, m in enumerate(polling.messages) if isinstance(m, Listed))
    before = [m for m in polling.messages[:first_listed] if isinstance(m, SourceState)]
    assert len(before) >= 2
    assert all("HTTP 401 Unauthorized" in s.error for s in before)


def test_faults_in_order_then_recovery(tls_files: TlsFiles) -> None:
    """500, not JSON, truncated: three errors naming the problem, then the list."""
    body = captured("kubelet-podlist-nri-minikube-1.35.json")
    with FakeKubelet(body=body, tls=tls_files) as kubelet:
        kubelet.fail("/pods", 500, times=1)
        kubelet.garbage("/pods", times=1)
        kubelet.truncate("/pods", times=1)
        creds = Credentials(kubelet.url, ca_file=tls_files.ca_cert, token=TokenSource("test-token"))
        with Polling(kubelet, creds) as polling:
            polling.until(1, Listed)
    errors = [m.error for m in polling.messages if isinstance(m, SourceState) and m.error]
    assert len(errors) == 3
    assert "HTTP 500" in errors[0] and "not JSON" in errors[1]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"kind": ["PodList"]}, "the kubelet's answer is not a PodList: kind a list"),
        (
            {"kind": "PodList", "items": "x"},
            "the kubelet's PodList: items: expected a list, got str",
        ),
        ([[[[]]]] * 3, "the kubelet's answer is not a PodList: a list"),
    ],
)
def test_the_message_of_a_body_that_is_not_a_pod_list(body: object, problem: str) -> None:
    with pytest.raises(ApiError) as err:
        pods_of(body, NAMING)
    assert str(err.value) == problem


def test_pods_that_are_not_valid_are_counted_and_the_rest_kept(tls_files: TlsFiles) -> None:
    body = json.loads(captured("kubelet-podlist-nri-minikube-1.35.json"))
    body["items"][0]["metadata"] = [1]
    body["items"][1]["spec"]["ports"] = None
    body["items"][2]["status"]["podIPs"] = [{"ip": 167837957}]
    raw = json.dumps(body).replace('"kube-system"', '"kube-\\ud800"', 1).encode()
    with FakeKubelet(body=raw, tls=tls_files) as kubelet:
        creds = Credentials(kubelet.url, ca_file=tls_files.ca_cert, token=TokenSource("test-token"))
        with Polling(kubelet, creds) as polling:
            (first,) = polling.until(1, Listed)[:1]
    rejected = [m for m in polling.messages if isinstance(m, Rejected)]
    assert rejected[0] == Rejected(KUBELET, PODS, 3)
    assert isinstance(first, Listed) and len(first.values) == 21


def test_an_exception_in_a_poll_is_logged_once_reported_and_survived(
    tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug (a RuntimeError three times): logged once with its traceback, the source down
    with it, then polling as before."""
    failures = 3
    original = kubelet.pods_of

    def broken(body: object, naming: Naming) -> object:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("boom")
        return original(body, naming)

    monkeypatch.setattr(kubelet, "pods_of", broken)
    body = captured("kubelet-podlist-nri-minikube-1.35.json")
    with FakeKubelet(body=body, tls=tls_files) as server:
        creds = Credentials(server.url, ca_file=tls_files.ca_cert, token=TokenSource("test-token"))
        with Polling(server, creds) as polling:
            polling.until(1, Listed)
    states = [m.error for m in polling.messages if isinstance(m, SourceState)]
    crash = (
        "unexpected failure (RuntimeError: boom), starting over: a kmeshd bug; please report"
        " it with the traceback logged"
    )
    assert states[:4] == [crash, crash, crash, ""]
    logged = [r for r in caplog.records if "unexpected failure" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
