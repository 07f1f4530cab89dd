"""The test apiserver and kubelet of tests/k8s_server.py, checked with real HTTPS requests."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.k8s_server import (
    CONTINUE_EXPIRED,
    GARBAGE,
    TESTDATA,
    ApiServer,
    Cluster,
    FakeKubelet,
    Request,
    load_into,
    load_items,
    status_body,
)
from tests.tls import TlsFiles

TOKEN = "test-token"
PODS = "/api/v1/pods"
SERVICES = "/api/v1/services"


def pod(
    name: str, namespace: str = "default", node: str = "node-0", ip: str = ""
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node},
        "status": {"phase": "Running", "podIP": ip},
    }


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


@pytest.fixture
def api(cluster: Cluster, tls_files: TlsFiles) -> Iterator[ApiServer]:
    with ApiServer(cluster, tls_files, token=TOKEN, max_watch_seconds=10) as server:
        yield server


def get(
    server: ApiServer | FakeKubelet,
    path: str,
    params: dict[str, Any] | None = None,
    token: str | None = TOKEN,
    **kwargs: Any,
) -> requests.Response:
    # verify= on each request: a REQUESTS_CA_BUNDLE in the environment beats Session.verify.
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    assert server.tls is not None
    kwargs.setdefault("verify", str(server.tls.ca_cert))
    return requests.get(server.url + path, params=params, headers=headers, timeout=15, **kwargs)


def names(body: dict[str, Any]) -> list[str]:
    return [i["metadata"]["name"] for i in body["items"]]


def watch_lines(response: requests.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines(chunk_size=None):
        if line:
            yield json.loads(line)


def watch(api: ApiServer, rv: int | str, seconds: float = 1, **params: Any) -> requests.Response:
    query = {"watch": "1", "resourceVersion": str(rv), "timeoutSeconds": str(seconds), **params}
    return get(api, PODS, query, stream=True)


# --- list -----------------------------------------------------------------------------------


def test_list_everything_sorted_without_limit(api: ApiServer, cluster: Cluster) -> None:
    for namespace, name in [("b", "x"), ("a", "z"), ("a", "y")]:
        cluster.put("pods", pod(name, namespace))
    r = get(api, PODS)
    assert r.status_code == 200
    body = r.json()
    assert (body["kind"], body["apiVersion"]) == ("PodList", "v1")
    assert body["metadata"] == {"resourceVersion": "3"}
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in body["items"]] == [
        ("a", "y"),
        ("a", "z"),
        ("b", "x"),
    ]
    assert "kind" not in body["items"][0]  # list items carry no kind, as from a real apiserver
    assert body["items"][0]["metadata"]["resourceVersion"] == "3"
    empty = get(api, "/apis/discovery.k8s.io/v1/endpointslices").json()
    assert empty["kind"] == "EndpointSliceList"
    assert empty["apiVersion"] == "discovery.k8s.io/v1"
    assert empty["items"] == []


def test_pages_are_one_snapshot_despite_changes(api: ApiServer, cluster: Cluster) -> None:
    for n in range(5):
        cluster.put("pods", pod(f"p{n}"))
    first = get(api, PODS, {"limit": 2}).json()
    assert names(first) == ["p0", "p1"]
    assert first["metadata"]["remainingItemCount"] == 3
    cluster.put("pods", pod("p2", ip="10.0.0.99"))  # changes between pages...
    cluster.put("pods", pod("p3a"))
    cluster.delete("pods", "default", "p4")
    seen, token = names(first), first["metadata"]["continue"]
    while token:
        page = get(api, PODS, {"limit": 2, "continue": token}).json()
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        assert all(i["status"]["podIP"] == "" for i in page["items"])
        seen += names(page)
        token = page["metadata"].get("continue")
    assert seen == ["p0", "p1", "p2", "p3", "p4"]  # ...are not seen by the paginated list
    assert names(get(api, PODS).json()) == ["p0", "p1", "p2", "p3", "p3a"]


def test_continue_token_from_before_compaction_is_410(api: ApiServer, cluster: Cluster) -> None:
    for n in range(3):
        cluster.put("pods", pod(f"p{n}"))
    token = get(api, PODS, {"limit": 1}).json()["metadata"]["continue"]
    assert get(api, PODS, {"limit": 1, "continue": token}).status_code == 200
    cluster.put("pods", pod("p9"))
    cluster.compact()
    r = get(api, PODS, {"limit": 1, "continue": token})
    assert r.status_code == 410
    assert r.json() == json.loads(status_body(410, CONTINUE_EXPIRED))
    assert r.json()["reason"] == "Expired"
    assert r.json()["message"].startswith("The provided continue parameter is too old")
    assert get(api, PODS, {"continue": "not-a-token"}).status_code == 400


def test_unknown_path_is_404(api: ApiServer) -> None:
    r = get(api, "/api/v1/nodes")
    assert r.status_code == 404
    assert r.json()["reason"] == "NotFound"


# --- watch ----------------------------------------------------------------------------------


def test_watch_from_rv_gets_exactly_the_later_events(api: ApiServer, cluster: Cluster) -> None:
    cluster.put("pods", pod("a"))
    rv = cluster.put("services", {"metadata": {"name": "s", "namespace": "default"}})
    cluster.put("pods", pod("b"))
    cluster.put("pods", pod("a", ip="10.0.0.1"))
    deleted_rv = cluster.delete("pods", "default", "b")
    cluster.put("services", {"metadata": {"name": "s2", "namespace": "default"}})
    started = time.monotonic()
    with watch(api, rv) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Transfer-Encoding"] == "chunked"
        events = list(watch_lines(r))
    assert 0.9 < time.monotonic() - started < 5  # ends after timeoutSeconds
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    assert all(e["object"]["kind"] == "Pod" and e["object"]["apiVersion"] == "v1" for e in events)
    assert events[2]["object"]["metadata"]["resourceVersion"] == str(deleted_rv)
    assert events[1]["object"]["status"]["podIP"] == "10.0.0.1"


def test_watch_streams_live_events_and_bookmarks(api: ApiServer, cluster: Cluster) -> None:
    rv = cluster.put("pods", pod("a"))
    with (
        watch(api, rv, seconds=2, allowWatchBookmarks="true") as with_bookmarks,
        watch(api, rv, seconds=2) as without,
    ):
        # Both are registered: the server sends the headers only after that.
        cluster.put("pods", pod("b"))
        cluster.bookmark()
        cluster.delete("pods", "default", "a")
        got = [list(watch_lines(r)) for r in (with_bookmarks, without)]
    assert [e["type"] for e in got[0]] == ["ADDED", "BOOKMARK", "DELETED"]
    assert [e["type"] for e in got[1]] == ["ADDED", "DELETED"]
    assert got[0][1] == {
        "type": "BOOKMARK",
        "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "2"}},
    }


def test_watch_from_zero_lists_current_objects_as_added(api: ApiServer, cluster: Cluster) -> None:
    cluster.put("pods", pod("a"))
    cluster.put("pods", pod("a", ip="10.0.0.2"))
    with watch(api, 0, seconds=0.5) as r:
        events = list(watch_lines(r))
    assert [(e["type"], e["object"]["status"]["podIP"]) for e in events] == [("ADDED", "10.0.0.2")]


def test_watch_from_compacted_rv_gets_error_event(api: ApiServer, cluster: Cluster) -> None:
    rv = cluster.put("pods", pod("a"))
    cluster.put("pods", pod("b"))
    cluster.compact()
    with watch(api, rv, seconds=5) as r:
        assert r.status_code == 200  # the 410 is inside the stream
        events = list(watch_lines(r))
    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 1 (2)",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]
    with watch(api, 2, seconds=0.3) as r:  # from the compaction point on is fine
        assert list(watch_lines(r)) == []


# --- authentication -------------------------------------------------------------------------

UNAUTHORIZED = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "Unauthorized",
    "reason": "Unauthorized",
    "code": 401,
}


def test_bearer_token_and_rotation(api: ApiServer) -> None:
    for token in (None, "wrong"):
        r = get(api, PODS, token=token)
        assert (r.status_code, r.json()) == (401, UNAUTHORIZED)
    assert get(api, PODS).status_code == 200
    api.token = "rotated"
    assert get(api, PODS).status_code == 401
    assert get(api, PODS, token="rotated").status_code == 200


def test_client_certificate_authenticates(api: ApiServer, tls_files: TlsFiles) -> None:
    cert = (str(tls_files.client_cert), str(tls_files.client_key))
    assert get(api, PODS, token=None, cert=cert).status_code == 200
    wrong = (str(tls_files.wrong_client_cert), str(tls_files.wrong_client_key))
    with pytest.raises(requests.exceptions.RequestException):  # the handshake fails
        get(api, PODS, token=None, cert=wrong)


# --- faults and the request log -------------------------------------------------------------


def test_fail_with_status_then_recover(api: ApiServer) -> None:
    api.fail(PODS, 500, times=2)
    api.fail(SERVICES, 429, headers={"Retry-After": "2"})
    assert [get(api, PODS).status_code for _ in range(3)] == [500, 500, 200]
    r = get(api, SERVICES)
    assert (r.status_code, r.headers["Retry-After"], r.json()["reason"]) == (
        429,
        "2",
        "TooManyRequests",
    )
    assert get(api, SERVICES).status_code == 200
    api.fail(PODS, 503, body=b"upstream connect error", watch=True)
    assert get(api, PODS).status_code == 200  # only watches were meant
    with watch(api, 0) as r:
        assert (r.status_code, r.content) == (503, b"upstream connect error")


def test_garbage_body(api: ApiServer) -> None:
    api.garbage(PODS)
    r = get(api, PODS)
    assert (r.status_code, r.content) == (200, GARBAGE)
    with pytest.raises(ValueError):
        r.json()
    assert get(api, PODS).json()["kind"] == "PodList"


def test_truncated_list_body(api: ApiServer, cluster: Cluster) -> None:
    for n in range(20):
        cluster.put("pods", pod(f"p{n}"))
    api.truncate(PODS)
    try:
        r = get(api, PODS)
    except requests.exceptions.RequestException:
        pass  # urllib3 2 raises on a short body...
    else:  # ...urllib3 1.26 (Debian 12) hands back the short body
        assert len(r.content) < int(r.headers["Content-Length"])
        with pytest.raises(ValueError):
            r.json()
    assert get(api, PODS).status_code == 200


def test_truncated_watch_line(api: ApiServer, cluster: Cluster) -> None:
    cluster.put("pods", pod("a"))
    cluster.put("pods", pod("b"))
    api.truncate(PODS, watch=True)
    with watch(api, 0, seconds=5) as r, pytest.raises(requests.exceptions.RequestException):
        for _ in r.iter_lines(chunk_size=None):
            pass
    with watch(api, 0, seconds=0.3) as r:
        assert len(list(watch_lines(r))) == 2


def test_watch_lifetime_closes_watches_cleanly(api: ApiServer, cluster: Cluster) -> None:
    rv = cluster.put("pods", pod("a"))
    api.watch_lifetime(0.5)
    started = time.monotonic()
    with watch(api, rv, seconds=30) as r:
        assert list(watch_lines(r)) == []  # no exception: the chunked body ended properly
    assert time.monotonic() - started < 3
    api.watch_lifetime(None)


def test_stop_refuses_then_start_on_the_same_port(api: ApiServer, cluster: Cluster) -> None:
    rv = cluster.put("pods", pod("a"))
    port = api.port
    with watch(api, rv, seconds=30) as open_watch:
        api.stop()
        with pytest.raises(requests.exceptions.RequestException):
            list(open_watch.iter_lines(chunk_size=None))  # the open stream is cut...
    with pytest.raises(requests.exceptions.ConnectionError):
        get(api, PODS)  # ...and new connections are refused
    api.start()
    assert api.port == port
    assert get(api, PODS).status_code == 200


def test_wrong_ca_server_certificate(api: ApiServer, tls_files: TlsFiles) -> None:
    api.use_wrong_ca()
    with pytest.raises(requests.exceptions.SSLError):
        get(api, PODS)
    assert get(api, PODS, verify=str(tls_files.wrong_ca_cert)).status_code == 200
    api.use_wrong_ca(False)
    assert get(api, PODS).status_code == 200


def test_request_log(api: ApiServer, cluster: Cluster) -> None:
    rv = cluster.put("pods", pod("a"))
    get(api, PODS, {"limit": "500"})
    get(api, SERVICES, token=None)
    with watch(api, rv, seconds=0.2) as r:
        r.content  # noqa: B018  (read to the end)
    assert api.log == [
        Request("GET", PODS, {"limit": "500"}, 200),
        Request("GET", SERVICES, {}, 401),
        Request(
            "GET", PODS, {"watch": "1", "resourceVersion": str(rv), "timeoutSeconds": "0.2"}, 200
        ),
    ]
    api.clear_log()
    assert api.log == []


# --- kubelet --------------------------------------------------------------------------------

KUBELET_FILES = sorted(TESTDATA.glob("kubelet-*.json"))


@pytest.mark.parametrize("path", KUBELET_FILES, ids=lambda p: p.name)
def test_kubelet_serves_a_captured_body_byte_for_byte(path: Path) -> None:
    with FakeKubelet(body=path.read_bytes()) as kubelet:  # plain HTTP, the read-only port
        assert kubelet.url.startswith("http://")
        r = requests.get(kubelet.url + "/pods", timeout=5)
    assert (r.status_code, r.content) == (200, path.read_bytes())


def test_kubelet_lists_its_nodes_pods(cluster: Cluster, tls_files: TlsFiles) -> None:
    cluster.put("pods", pod("here", node="node-a"))
    cluster.put("pods", pod("there", node="node-b"))
    cluster.put("pods", pod("also-here", namespace="kube-system", node="node-a"))
    with FakeKubelet("node-a", cluster=cluster, tls=tls_files, token=TOKEN) as kubelet:
        r = get(kubelet, "/pods")
        assert r.status_code == 200
        assert r.json()["kind"] == "PodList"
        assert r.json()["metadata"] == {}
        assert names(r.json()) == ["here", "also-here"]
        unauthorized = get(kubelet, "/pods", token="wrong")
        assert (unauthorized.status_code, unauthorized.text) == (401, "Unauthorized")
        cert = (str(tls_files.client_cert), str(tls_files.client_key))
        assert get(kubelet, "/pods", token=None, cert=cert).status_code == 200
        kubelet.fail("/pods", 500)
        assert get(kubelet, "/pods").status_code == 500
        assert get(kubelet, "/nope").status_code == 404
        assert [(e.path, e.status) for e in kubelet.log] == [
            ("/pods", 200),
            ("/pods", 401),
            ("/pods", 200),
            ("/pods", 500),
            ("/nope", 404),
        ]


# --- captured payloads ----------------------------------------------------------------------


def test_load_items_of_each_capture_format(cluster: Cluster) -> None:
    kubelet = load_items(TESTDATA / "kubelet-podlist-datadog-null-and-empty-items.json")
    assert len(kubelet) == 2  # null skipped; {} kept
    assert kubelet[0]["kind"] == "Pod"
    assert load_items(TESTDATA / "kubelet-podlist-datadog-items-null.json") == []
    yaml_list = load_items(
        TESTDATA / "apiserver-list-dualstack-service-endpointslices-cilium-kind-1.27.yaml"
    )
    assert {o["kind"] for o in yaml_list} == {"Service", "Endpoints", "EndpointSlice"}
    replay = load_items(TESTDATA / "apiserver-watch-pods-k8s-openapi-kind-1.36.replay.json")
    assert [o["kind"] for o in replay] == ["Pod"] * 5
    assert load_into(cluster, TESTDATA / "apiserver-list-pods-nri-minikube-1.35.yaml") == 25
    path = TESTDATA / "apiserver-list-dualstack-service-endpointslices-cilium-kind-1.27.yaml"
    assert load_into(cluster, path) == 5  # Endpoints are not served
    slices = cluster.list_page("endpointslices", None, None)[1]
    assert len(json.loads(slices)["items"]) == 3


# --- scale ----------------------------------------------------------------------------------


def test_scale_150k_pods(cluster: Cluster, tls_files: TlsFiles) -> None:
    started = time.monotonic()
    cluster.load_synthetic(pods=150_000, services=20_000, nodes=100)
    load_seconds = time.monotonic() - started
    with ApiServer(cluster, tls_files, token=TOKEN) as api, requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        started = time.monotonic()
        count, pages, params = 0, 0, {"limit": "500"}
        while True:
            r = session.get(api.url + PODS, params=params, verify=str(tls_files.ca_cert))
            body = r.json()
            count, pages = count + len(body["items"]), pages + 1
            if not body["metadata"].get("continue"):
                break
            params["continue"] = body["metadata"]["continue"]
        list_seconds = time.monotonic() - started
    print(f"\nload 150k pods + 20k services + 20k slices: {load_seconds:.2f} s")
    print(f"paginated list of {count} pods in {pages} pages of 500: {list_seconds:.2f} s")
    assert (count, pages) == (150_000, 300)
    assert load_seconds < 10
    assert list_seconds < 20
