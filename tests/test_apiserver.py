"""kmeshd.identity.apiserver: list + watch against a test apiserver speaking the real
protocol over HTTPS (resourceVersion, bookmarks, 410 Gone, pagination, faults)."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmeshd.backoff import Backoff
from kmeshd.identity import apiserver
from kmeshd.identity.apiserver import RESOURCES, Event, Page, Watcher
from kmeshd.identity.client import ApiError, Client, Expired
from kmeshd.identity.credentials import Credentials, TokenSource
from kmeshd.identity.objects import Naming, Pod
from kmeshd.identity.updates import Changed, Deleted, Listed, Rejected, SourceState, Update
from tests.k8s_server import TESTDATA, ApiServer, Cluster, load_into, synthetic_pod_ip
from tests.tls import TlsFiles

PODS = RESOURCES[0]
PODS_PATH = "/api/v1/pods"


def credentials(server: ApiServer, tls: TlsFiles, token: str = "test-token") -> Credentials:
    return Credentials(server=server.url, ca_file=tls.ca_cert, token=TokenSource(token))


class Running:
    """A watcher in its thread, its messages collected."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.messages: list[Update] = []
        self.thread = threading.Thread(target=watcher.run, daemon=True)
        self.thread.start()

    def wait_for(self, check: Callable[[list[Update]], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._drain()
            if check(self.messages):
                return
            time.sleep(0.02)
        raise AssertionError(f"not seen within {timeout}s; got {self.messages[-5:]}")

    def _drain(self) -> None:
        out = self.watcher.out
        while True:
            try:
                self.messages.append(out.get_nowait())
            except queue.Empty:
                return

    def of(self, kind: type) -> list[Any]:
        self._drain()
        return [m for m in self.messages if isinstance(m, kind)]


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


@pytest.fixture
def server(cluster: Cluster, tls_files: TlsFiles) -> Iterator[ApiServer]:
    with ApiServer(cluster, tls_files) as s:
        yield s


@contextlib.contextmanager
def watching(
    server: ApiServer, tls: TlsFiles, resource: apiserver.Resource = PODS
) -> Iterator[Running]:
    stop = threading.Event()
    client = Client(credentials(server, tls))
    fast = Backoff(base=0.1, cap=0.5)
    watcher = Watcher(client, resource, Naming(), queue.Queue(), stop, backoff=fast)
    running = Running(watcher)
    try:
        yield running
    finally:
        stop.set()
        server.stop()  # ends the open watch, so the thread sees `stop`
        running.thread.join(timeout=5)


def pod(name: str, ip: str, uid: str = "") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": uid or f"uid-{name}",
            "creationTimestamp": "2026-12-01T10:00:00Z",
        },
        "spec": {"nodeName": "node-0", "serviceAccountName": "web"},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def listed(messages: list[Update]) -> list[Listed]:
    return [m for m in messages if isinstance(m, Listed)]


def names(update: Listed) -> set[str]:
    return {p.workload.name for p in update.values}


def lists_and_watches(server: ApiServer, path: str = PODS_PATH) -> list[str]:
    return [
        "watch" if r.query.get("watch") else "list"
        for r in server.log
        if r.path == path and r.status == 200
    ]


def test_a_real_pod_list_then_its_changes(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """The captured minikube pods arrive as one list; a new pod, a change and a deletion then
    arrive as watch events, each exactly once."""
    load_into(cluster, TESTDATA / "apiserver-list-pods-nri-minikube-1.35.yaml")
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: bool(listed(m)))
        (first,) = listed(running.messages)
        assert len(first.values) == 25
        assert "coredns-7d764666f9-qdcxt" in names(first)
        running.wait_for(lambda m: any(r.query.get("watch") for r in server.log))
        cluster.put("pods", pod("web-1", "10.244.0.50"))
        cluster.put("pods", pod("web-1", "10.244.0.51"))
        cluster.delete("pods", "shop", "web-1")
        running.wait_for(lambda m: len(running.of(Deleted)) == 1)
        changed = [c.value for c in running.of(Changed)]
        assert [str(p.workload.addresses[0]) for p in changed] == ["10.244.0.50", "10.244.0.51"]
        assert [d.key for d in running.of(Deleted)] == ["uid-web-1"]


def test_a_large_list_comes_in_pages_and_once(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """1,234 pods: three pages of at most 500, one Listed with every pod, then a watch from
    the list's resourceVersion."""
    cluster.load_synthetic(pods=1234, services=10, nodes=3)
    version = str(cluster.resource_version)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: any(r.query.get("watch") for r in server.log))
        (only,) = listed(running.messages)
        assert len(only.values) == 1234
        ips = {str(p.workload.addresses[0]) for p in only.values}
        assert ips == {synthetic_pod_ip(i) for i in range(1234)}
        pages = [r.query for r in server.log if r.path == PODS_PATH and not r.query.get("watch")]
        assert [q.get("limit") for q in pages] == ["500"] * 3
        assert "continue" not in pages[0] and all("continue" in q for q in pages[1:])
        first_watch = next(r.query for r in server.log if r.query.get("watch"))
        assert first_watch["resourceVersion"] == version
        assert first_watch["allowWatchBookmarks"] == "true"
        assert 300 <= int(first_watch["timeoutSeconds"]) <= 600


def test_watches_that_keep_closing_never_cause_a_relist(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """Watches cut every 0.3 s (shorter than a watch's pause after an event): each new
    watch resumes from the last version seen, the events in between arrive once, and there
    is still exactly one list."""
    server.watch_lifetime(0.3)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: bool(listed(m)))
        for i in range(8):
            cluster.put("pods", pod(f"web-{i}", f"10.244.1.{i}"))
            time.sleep(0.3)
        running.wait_for(lambda m: len(running.of(Changed)) == 8)
        time.sleep(0.5)
        assert [c.value.workload.name for c in running.of(Changed)] == [
            f"web-{i}" for i in range(8)
        ]
        kinds = lists_and_watches(server)
        assert kinds.count("list") == 1 and kinds.count("watch") >= 4


def test_a_bookmark_moves_the_version_the_next_watch_starts_from(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """Changes to other resources move the global version; a bookmark hands it to the pod
    watch, whose next watch starts there instead of from an old (soon compacted) one."""
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: any(r.query.get("watch") for r in server.log))
        for i in range(3):
            cluster.put(
                "services", {"metadata": {"name": f"s{i}", "namespace": "shop"}, "spec": {}}
            )
        cluster.bookmark()
        bookmarked = str(cluster.resource_version)
        time.sleep(0.3)
        server.watch_lifetime(0.01)  # end the watch; the next one shows where it resumes
        running.wait_for(lambda m: len([r for r in server.log if r.query.get("watch")]) >= 2)
        second = [r.query for r in server.log if r.query.get("watch")][1]
        assert second["resourceVersion"] == bookmarked


def test_a_compacted_version_leads_to_one_relist(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """Down while the cluster changed and compacted: the watch gets 410 (an ERROR event),
    the watcher lists again, and the new list has what happened meanwhile."""
    cluster.put("pods", pod("old", "10.244.2.1"))
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: bool(listed(m)))
        running.wait_for(lambda m: any(r.query.get("watch") for r in server.log))
        server.stop()
        cluster.delete("pods", "shop", "old")
        cluster.put("pods", pod("new", "10.244.2.2"))
        cluster.compact()
        server.start()
        running.wait_for(lambda m: len(listed(m)) == 2)
        assert names(listed(running.messages)[1]) == {"new"}
        assert lists_and_watches(server).count("list") == 2


def test_a_continue_token_that_expired_restarts_the_list(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """Compaction between two pages: 410 on the continue token, and the list starts over
    from the first page; what arrives is one complete list."""
    cluster.load_synthetic(pods=700, services=5, nodes=2)
    client = Client(credentials(server, tls_files))
    original = client.get_json
    calls = 0

    def compact_after_first_page(path: str, params: Any = None) -> Any:
        nonlocal calls
        calls += 1
        body = original(path, params)
        if calls == 1:  # the cluster moves on and compacts its history
            cluster.put("services", {"metadata": {"name": "s", "namespace": "shop"}, "spec": {}})
            cluster.compact()
        return body

    client.get_json = compact_after_first_page  # type: ignore[method-assign]
    stop = threading.Event()
    running = Running(Watcher(client, PODS, Naming(), queue.Queue(), stop, Backoff(0.1, 0.5)))
    running.wait_for(lambda m: bool(listed(m)))
    stop.set()
    server.stop()
    (only,) = listed(running.messages)
    assert len(only.values) == 700
    statuses = [r.status for r in server.log if r.path == PODS_PATH and not r.query.get("watch")]
    assert statuses[:4] == [200, 410, 200, 200]


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (lambda s: s.fail(PODS_PATH, 500, times=2, watch=False), "HTTP 500"),
        (lambda s: s.garbage(PODS_PATH, times=2, watch=False), "not JSON"),
        (lambda s: s.truncate(PODS_PATH, times=2, watch=False), PODS_PATH),
        (lambda s: s.fail(PODS_PATH, 503, times=2, watch=False), "HTTP 503"),
    ],
)
def test_a_failing_list_is_retried_and_reported(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles, fault: Any, message: str
) -> None:
    """500s, bodies that are not JSON, bodies cut short: the source reports the error,
    backs off, and the third try lists everything."""
    cluster.put("pods", pod("web", "10.244.3.1"))
    fault(server)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: bool(listed(m)))
        errors = [s.error for s in running.of(SourceState) if s.error]
        assert len(errors) == 2 and all(message in e for e in errors)
        assert running.of(SourceState)[-1].error == ""
        assert names(listed(running.messages)[0]) == {"web"}


def test_a_watch_line_cut_in_the_middle_resumes_without_loss(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """A watch whose stream breaks mid-event: watch again from the last whole event; the
    broken one arrives (once) on the new watch, and nothing is relisted."""
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: any(r.query.get("watch") for r in server.log))
        server.truncate(PODS_PATH, times=1, watch=True)
        server.watch_lifetime(0.01)  # the next watch is the truncated one
        time.sleep(0.3)
        server.watch_lifetime(None)
        cluster.put("pods", pod("web", "10.244.4.1"))
        running.wait_for(lambda m: len(running.of(Changed)) == 1)
        time.sleep(0.3)
        assert len(running.of(Changed)) == 1
        assert lists_and_watches(server).count("list") == 1


def test_429_waits_as_long_as_retry_after_says(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """Too Many Requests with Retry-After: 1: the next try comes a second later, not after
    the backoff's 0.1 s."""
    server.fail(PODS_PATH, 429, headers={"Retry-After": "1"}, times=1, watch=False)
    started = time.monotonic()
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: bool(listed(m)))
        assert time.monotonic() - started >= 1.0
        assert [r.status for r in server.log if r.path == PODS_PATH][:2] == [429, 200]


def test_an_expired_token_is_read_again_from_its_file(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles, tmp_path: Path
) -> None:
    """401 after the token rotated: the source says so, re-reads the token file at once
    (not after its minute), and carries on with the new token."""
    token_file = tmp_path / "token"
    token_file.write_text("test-token\n")
    stop = threading.Event()
    creds = Credentials(
        server=server.url, ca_file=tls_files.ca_cert, token=TokenSource.from_file(token_file)
    )
    running = Running(
        Watcher(Client(creds), PODS, Naming(), queue.Queue(), stop, Backoff(0.1, 0.5))
    )
    running.wait_for(lambda m: any(r.query.get("watch") for r in server.log))
    server.token = "rotated"
    token_file.write_text("rotated\n")
    server.watch_lifetime(0.01)
    running.wait_for(lambda m: any("401" in (s.error or "") for s in running.of(SourceState)))
    server.watch_lifetime(None)
    cluster.put("pods", pod("web", "10.244.5.1"))
    running.wait_for(lambda m: len(running.of(Changed)) == 1)
    stop.set()
    server.stop()
    (error,) = {s.error for s in running.of(SourceState) if s.error}
    assert "401 Unauthorized" in error


def test_a_server_certificate_from_another_ca_is_refused_and_named(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """Wrong CA: no identities from an unverified server, and a message pointing at the CA."""
    server.use_wrong_ca(True)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: bool(running.of(SourceState)))
        error = running.of(SourceState)[0].error
        assert "TLS failed" in error and "CA" in error
        assert not listed(running.messages)
        server.use_wrong_ca(False)
        running.wait_for(lambda m: bool(listed(m)))


def test_services_and_endpoint_slices_from_a_real_capture(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """The dual-stack cilium capture through the services and endpointslices watchers."""
    load_into(
        cluster, TESTDATA / "apiserver-list-dualstack-service-endpointslices-cilium-kind-1.27.yaml"
    )
    for resource in RESOURCES[1:]:
        with watching(server, tls_files, resource) as running:
            running.wait_for(lambda m: bool(listed(m)))
            values = listed(running.messages)[0].values
            assert {v.namespace for v in values} >= {"default"}
            assert len(values) == (2 if resource.name == "services" else 3)
        server.start()


def test_pods_are_parsed_into_identities(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """What the watcher hands on is the cache's Pod, not raw JSON."""
    cluster.put("pods", pod("web", "10.244.6.1"))
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: bool(listed(m)))
        (p,) = listed(running.messages)[0].values
        assert isinstance(p, Pod)
        assert p.workload.principal == "spiffe://cluster.local/ns/shop/sa/web"


class Stream:
    """Events each ready after a given delay, on a fake clock; records the pauses."""

    def __init__(self, delays: list[float]) -> None:
        self.now = 0.0
        self.delays = delays
        self.pauses: list[tuple[int, float]] = []  # (events read so far, seconds)
        self.read = 0
        self.closed = False

    def events(self) -> Generator[int, None, None]:
        try:
            for delay in self.delays:
                self.now += delay
                self.read += 1
                yield self.read
        finally:
            self.closed = True

    def wait(self, seconds: float) -> bool:
        self.pauses.append((self.read, seconds))
        self.now += seconds
        return False


@pytest.mark.parametrize(
    ("delays", "pauses_after"),
    [
        ([0.05, 0.05, 0.05], [1, 2, 3]),  # one event at a time: a pause after each
        ([0.05, 0, 0, 0, 0.2, 0], [1, 5]),  # what piled up is read without a pause
        ([0, 0, 0], []),  # a burst already buffered: no pause at all
        ([0.004, 0.006], [2]),  # waiting up to CAUGHT_UP_S is not waiting
        ([], []),
    ],
)
def test_a_watch_pauses_only_after_reads_that_waited(
    delays: list[float], pauses_after: list[int]
) -> None:
    stream = Stream(delays)
    got = list(apiserver.paced(stream.events(), stream.wait, lambda: stream.now))
    assert got == list(range(1, len(delays) + 1))
    assert stream.pauses == [(n, apiserver.WATCH_PAUSE_S) for n in pauses_after]
    assert stream.closed


def test_a_stop_during_a_pause_ends_the_watch_and_closes_the_stream() -> None:
    stream = Stream([0.05, 0.05, 0.05])
    got = list(apiserver.paced(stream.events(), lambda s: True, lambda: stream.now))
    assert got == [1]
    assert stream.closed


# -- the envelopes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"metadata": {"resourceVersion": "7"}, "items": None}, Page([], "7", "")),
        (
            {"metadata": {"resourceVersion": "7", "continue": "eyJ2Ijo"}, "items": [{}]},
            Page([{}], "7", "eyJ2Ijo"),
        ),
        ([], "expected a list object, got list"),
        ({"metadata": [], "items": []}, "metadata: expected an object, got list"),
        ({"items": []}, "metadata: expected an object, got null"),
        (
            {"metadata": {"resourceVersion": 7}},
            "metadata.resourceVersion: missing or not a version",
        ),
        ({"metadata": {"resourceVersion": "7 8"}}, "metadata.resourceVersion: missing or not"),
        ({"metadata": {"resourceVersion": "7" * 129}}, "metadata.resourceVersion: missing or not"),
        ({"metadata": {"resourceVersion": "7", "continue": 5}}, "metadata.continue: not a contin"),
        ({"metadata": {"resourceVersion": "7", "continue": "a\ud800"}}, "metadata.continue: not a"),
        ({"metadata": {"resourceVersion": "7"}, "items": {}}, "items: expected a list, got dict"),
    ],
)
def test_a_list_page_envelope(body: Any, expected: Page | str) -> None:
    if isinstance(expected, Page):
        assert apiserver.list_page(body) == expected
        return
    with pytest.raises(ApiError) as err:
        apiserver.list_page(body)
    assert str(err.value).startswith(f"the apiserver's answer is not JSON we can use: {expected}")


OBJ = {"metadata": {"name": "web", "resourceVersion": "9"}}


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"type": "ADDED", "object": OBJ}, Event("ADDED", OBJ, "9")),
        ({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "x y"}}}, None),
        ({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": 12}}}, None),
        ({"type": "DELETED", "object": {"metadata": []}}, None),
        ("ADDED", "a watch event is a str, not an object"),
        ({"type": "ADDED", "object": []}, "a ADDED event's object is a list"),
        ({"type": "SYNC", "object": OBJ}, "a watch event's type is 'SYNC'"),
        ({"type": ["ADDED"], "object": OBJ}, "a watch event's type is a list"),
        ({"type": "ERROR", "object": {"code": 410, "message": "gone"}}, "watch: 410 Gone (gone)"),
        ({"type": "ERROR", "object": {"code": 500, "message": ["x"]}}, "watch: error event 500"),
        ({"type": "ERROR", "object": [[[]]]}, "watch: error event without a code (no message)"),
    ],
)
def test_a_watch_event_envelope(event: Any, expected: Event | str | None) -> None:
    """An event whose version is not one is returned without one (to be rejected); one
    that is no event at all is an ApiError, a 410 an Expired."""
    if expected is None:
        assert apiserver.watch_event(event).version is None
        return
    if isinstance(expected, Event):
        assert apiserver.watch_event(event) == expected
        return
    with pytest.raises(ApiError) as err:
        apiserver.watch_event(event)
    assert expected in str(err.value)
    assert isinstance(err.value, Expired) == ("410" in expected)


# -- hostile apiservers -------------------------------------------------------------------


def statuses(server: ApiServer, watch: bool, path: str = PODS_PATH) -> list[int]:
    return [r.status for r in server.log if r.path == path and bool(r.query.get("watch")) == watch]


def rejected(running: Running) -> int:
    return sum(r.count for r in running.of(Rejected))


def events(*lines: Any) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def test_an_exception_in_the_loop_is_logged_once_reported_and_survived(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug (here a RuntimeError from the client, three times): logged once with its
    traceback, the source reported down with it, then listing and watching again."""
    cluster.put("pods", pod("web", "10.244.7.1"))
    client = Client(credentials(server, tls_files))
    original = client.get_json
    failures = 3

    def broken(path: str, params: Any = None) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("boom")
        return original(path, params)

    client.get_json = broken  # type: ignore[method-assign]
    stop = threading.Event()
    running = Running(Watcher(client, PODS, Naming(), queue.Queue(), stop, Backoff(0.1, 0.5)))
    try:
        running.wait_for(lambda m: bool(listed(m)))
        running.wait_for(lambda m: any(r.query.get("watch") for r in server.log))
    finally:
        stop.set()
        server.stop()
        running.thread.join(timeout=5)
    errors = [s.error for s in running.of(SourceState)]
    crash = (
        "unexpected failure (RuntimeError: boom), starting over: a kmeshd bug; please report"
        " it with the traceback logged"
    )
    assert errors[:4] == [crash, crash, crash, ""]
    logged = [r for r in caplog.records if "unexpected failure" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert names(listed(running.messages)[0]) == {"web"}


def test_retry_after_zero_is_a_second_not_a_request_loop(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    server.fail(PODS_PATH, 429, headers={"Retry-After": "0"}, times=1000, watch=False)
    with watching(server, tls_files) as running:
        time.sleep(2.5)
        assert len(statuses(server, watch=False)) == 3  # at 0, 1 and 2 s
        assert running.thread.is_alive()


def test_a_huge_retry_after_is_capped_and_the_watcher_lives(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    server.fail(PODS_PATH, 429, headers={"Retry-After": "9" * 400}, times=1, watch=False)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: bool(running.of(SourceState)))
        time.sleep(0.3)
        assert running.thread.is_alive()
        assert running.of(SourceState)[0].error.endswith("HTTP 429 (TooManyRequests)")


def test_a_410_on_every_watch_relists_once_at_once_then_after_backoff(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """Expired once: list again at once. Expired at every watch: the lists back off
    (0.1 s doubling to 0.5 s here), not back to back."""
    gone = events({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "old"}})
    server.fail(PODS_PATH, 200, body=gone, times=1000, watch=True)
    with watching(server, tls_files) as running:
        time.sleep(2.0)
        lists = statuses(server, watch=False)
        assert 4 <= len(lists) <= 10  # back to back, it was hundreds
        assert any("410 Gone (old); again" in s.error for s in running.of(SourceState))


def test_a_repeated_continue_token_ends_the_list_with_an_error(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    page = {
        "kind": "PodList",
        "metadata": {"resourceVersion": "5", "continue": "c2FtZQ"},
        "items": [pod("web", "10.244.8.1")],
    }
    server.fail(PODS_PATH, 200, body=page, times=1000, watch=False)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: bool(running.of(SourceState)))
        error = running.of(SourceState)[0].error
        assert error == (
            "list pods: the apiserver sent a continue token it had sent before (paging would"
            " never end); listing again later"
        )
        assert statuses(server, watch=False)[:2] == [200, 200]
        assert not listed(running.messages)


def test_a_bookmark_with_a_bad_version_is_rejected_and_the_watch_goes_on(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """A BOOKMARK whose version is no version: counted, and the next watch starts from the
    last good version, not from one the apiserver answers with 400."""
    cluster.put("pods", pod("web", "10.244.9.1"))
    version = str(cluster.resource_version)
    bad = events({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "x y"}}})
    server.fail(PODS_PATH, 200, body=bad, times=1, watch=True)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: len([r for r in server.log if r.query.get("watch")]) >= 2)
        assert rejected(running) == 1
        second = [r.query for r in server.log if r.query.get("watch")][1]
        assert second["resourceVersion"] == version


def test_watches_refused_again_and_again_lead_to_a_relist(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    """400 for every watch (a version the apiserver cannot take): after 5 in a row, list
    again, and watch from the new list's version."""
    server.fail(PODS_PATH, 400, times=5, watch=True)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: len(listed(m)) == 2)
        assert statuses(server, watch=True)[:5] == [400] * 5
        assert [r.status for r in server.log][:7] == [200] + [400] * 5 + [200]
        assert lists_and_watches(server)[:2] == ["list", "list"]


@pytest.mark.parametrize(
    ("stream", "count"),
    [
        ({"type": "MODIFIED", "object": {"metadata": []}}, 1),
        ({"type": "DELETED", "object": {"metadata": "x", "resourceVersion": "3"}}, 1),
        (
            {
                "type": "ADDED",
                "object": {**pod("w", "10.1.1.1"), "metadata": {"resourceVersion": "3"}},
            },
            1,
        ),
        ({"type": "ADDED", "object": {**pod("w", "10.1.1.1"), "spec": 5}}, 1),
    ],
)
def test_an_event_with_an_object_that_is_not_valid_is_skipped_and_counted(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles, stream: Any, count: int
) -> None:
    """Counted as rejected; the watcher lives, and the next good event arrives."""
    server.fail(PODS_PATH, 200, body=events(stream), times=1, watch=True)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: len([r for r in server.log if r.query.get("watch")]) >= 2)
        cluster.put("pods", pod("web", "10.244.10.1"))
        running.wait_for(lambda m: len(running.of(Changed)) == 1)
        assert rejected(running) == count


def surrogate_pod() -> bytes:
    evil = pod("evil", "10.244.11.1")
    evil["metadata"]["labels"] = {"app": "PLACEHOLDER"}
    evil["metadata"]["resourceVersion"] = "3"
    text = json.dumps({"type": "ADDED", "object": evil})
    return text.replace("PLACEHOLDER", "\\ud800").encode() + b"\n"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"[" * 5000 + b"\n", "nested too deeply"),
        (b'{"type":"ADDED","object":' + b"[" * 900 + b"]" * 900 + b"}\n", "object is a list"),
        (b'"just a string"\n', "a watch event is a str"),
    ],
)
def test_a_watch_line_that_is_not_an_event_is_an_error_not_the_end(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles, body: bytes, problem: str
) -> None:
    server.fail(PODS_PATH, 200, body=body, times=1, watch=True)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: any(problem in (s.error or "") for s in running.of(SourceState)))
        cluster.put("pods", pod("web", "10.244.12.1"))
        running.wait_for(lambda m: len(running.of(Changed)) == 1)


def test_a_label_with_a_lone_surrogate_never_reaches_the_cache(
    cluster: Cluster, server: ApiServer, tls_files: TlsFiles
) -> None:
    server.fail(PODS_PATH, 200, body=surrogate_pod(), times=1, watch=True)
    with watching(server, tls_files) as running:
        running.wait_for(lambda m: rejected(running) == 1)
        assert running.of(Changed) == []
        assert running.thread.is_alive()
