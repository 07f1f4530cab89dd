"""Beyond the seed's counters, with real eBPF and namespaces as pods: live bytes of long
connections, active connections, resets, failure reasons, RTT under a known delay, loss."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemon_proc import Daemon, Samples, value
from tests.e2e import INVENTORY, W, closed, exchange, hold, release, serve
from tests.netns import Pod, is_root, sh

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not is_root(), reason="real eBPF needs root"),
]

REPORTERS = ("source", "destination")
CHUNK = 256 * 1024


class Stream:
    """A long connection from tests/traffic.py's `stream`: the test says when to send."""

    def __init__(self, client: Pod, server: Pod, chunks: int, reply: int, port: int = 80):
        self.request = 9 + chunks * CHUNK  # the 9-byte header, then the chunks
        self.reply = reply
        self.acked = 0
        self.server = serve(server, 1, port=port)
        self.proc = subprocess.Popen(
            client.traffic(
                "stream", "--host", server.ip4, "--port", str(port),
                "--request", str(self.request), "--reply", str(reply),
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self._expect_acked(9)

    def _expect_acked(self, n: int) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "acked"
        self.acked += n

    def send(self, n: int = CHUNK) -> None:
        """Write n bytes; returns once the server acknowledged all of them."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"send {n}\n")
        self.proc.stdin.flush()
        self._expect_acked(n)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("close\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0
        assert self.server.wait(timeout=30) == 0


def both(s: Samples, name: str, **labels: str) -> list[float]:
    return [value(s, W + name, reporter=r, **labels) for r in REPORTERS]


def test_a_long_connection_shows_its_bytes_while_open_and_exactly_at_close(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """256 KiB a second for 5 intervals: after each send is acknowledged, both reporters
    show exactly the bytes so far within interval + 1 s; the close adds only the rest."""
    daemon = Daemon(tmp_path, INVENTORY, pin_dir, interval="1s")
    daemon.start()
    try:
        stream = Stream(pods["client"], pods["server"], chunks=5, reply=5)
        for i in range(5):
            stream.send()
            sent_at = time.monotonic()
            # The server replies once it has the whole request: after the last chunk.
            want = ([stream.acked] * 2, [5 if i == 4 else 0] * 2)

            def shows(s: Samples, want: tuple[list[int], list[int]] = want) -> bool:
                return (both(s, "received_bytes_total"), both(s, "sent_bytes_total")) == want

            s = daemon.wait_for(shows, timeout=2.0, what=f"{want} bytes while open")
            assert time.monotonic() - sent_at <= 2.0  # metrics.interval + 1 s
            assert both(s, "connections_opened_total") == [1, 1]
            assert both(s, "connections_closed_total") == [0, 0]
            time.sleep(max(0.0, 1.0 - (time.monotonic() - sent_at)))  # 256 KiB a second
        stream.close()
        s = daemon.wait_for(closed(1), what="the close")
        assert both(s, "received_bytes_total") == [stream.request, stream.request]
        assert both(s, "sent_bytes_total") == [5, 5]
        assert stream.request == 9 + 5 * CHUNK
    finally:
        daemon.close()


def test_without_live_updates_bytes_arrive_at_close_only(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """bpf.live_updates = false: an open connection's bytes stay out of the counters for
    publish after publish, then its close brings them all, exactly."""
    daemon = Daemon(tmp_path, INVENTORY, pin_dir, bpf="live_updates = false")
    daemon.start()
    try:
        stream = Stream(pods["client"], pods["server"], chunks=2, reply=5)
        stream.send()
        s = daemon.wait_for(lambda s: both(s, "connections_opened_total") == [1, 1])
        time.sleep(1.0)  # five publishes at 200 ms
        s = daemon.samples()
        assert both(s, "received_bytes_total") == [0, 0]
        assert both(s, "connections_active") == [1, 1]
        stream.send()
        stream.close()
        s = daemon.wait_for(closed(1), what="the close")
        assert both(s, "received_bytes_total") == [stream.request] * 2
        assert both(s, "sent_bytes_total") == [5, 5]
    finally:
        daemon.close()


def test_restart_with_a_connection_open_counts_it_once_and_never_goes_back(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """kmeshd restarts while a connection is open and sending: opened stays 1, bytes sent
    while no daemon ran arrive with the next update, no counter ever decreases."""
    daemon = Daemon(tmp_path, INVENTORY, pin_dir)
    daemon.start()
    seen: list[list[float]] = []
    stream = Stream(pods["client"], pods["server"], chunks=4, reply=7)
    try:
        stream.send()
        s = daemon.wait_for(lambda s: both(s, "received_bytes_total") == [stream.acked] * 2)
        seen.append(both(s, "received_bytes_total"))
        assert daemon.stop() == 0
        stream.send()  # nothing attached: the socket's state waits in the pinned map
        daemon = Daemon(tmp_path, INVENTORY, pin_dir)
        daemon.start()
        seen.append(both(daemon.samples(), "received_bytes_total"))
        stream.send()
        s = daemon.wait_for(lambda s: both(s, "received_bytes_total") == [stream.acked] * 2)
        seen.append(both(s, "received_bytes_total"))
        stream.send()
        stream.close()
        s = daemon.wait_for(closed(1), what="the close")
        seen.append(both(s, "received_bytes_total"))
        assert both(s, "connections_opened_total") == [1, 1]
        assert both(s, "received_bytes_total") == [stream.request] * 2
        assert both(s, "sent_bytes_total") == [7, 7]
        assert seen == sorted(seen) and seen[0][0] == 9 + CHUNK
    finally:
        daemon.close()


def test_active_connections_count_what_is_open_now(daemon: Daemon, pods: dict[str, Pod]) -> None:
    """Three open connections show 3 for each reporter; after they close, 0."""
    servers = [serve(pods["server"], 1, port=port) for port in (80, 81, 82)]
    held = [hold(pods["client"], pods["server"].ip4, 50, 5, port=port) for port in (80, 81, 82)]
    s = daemon.wait_for(lambda s: both(s, "connections_active") == [3, 3], what="3 active")
    assert value(s, "kmesh_tcp_connections_active", reporter="source") == 3
    for h in held:
        release(h)
    assert [server.wait(timeout=10) for server in servers] == [0, 0, 0]
    s = daemon.wait_for(closed(3), what="3 closed")
    assert both(s, "connections_active") == [0, 0]
    assert both(s, "connections_opened_total") == [3, 3]


def test_a_connection_reset_after_establishment_is_counted_as_reset(
    daemon: Daemon, pods: dict[str, Pod]
) -> None:
    """The client closes with SO_LINGER 0: the server's socket is reset by its peer. That
    connection was opened and closed, counted reset by the destination; nothing failed."""
    exchange(pods, [(100, 5, 2)])
    s = daemon.wait_for(closed(1), what="the reset connection closed")
    assert value(s, W + "connections_reset_total", reporter="destination") == 1
    assert value(s, W + "connections_reset_total", reporter="source") == 0  # it sent the RST
    assert both(s, "connections_opened_total") == [1, 1]
    assert both(s, "connections_failed_total") == [0, 0]
    assert value(s, W + "connect_failures_total") == 0


def buckets(s: Samples, name: str, reporter: str) -> dict[str, float]:
    """Cumulative counts of a histogram by le, for one reporter."""
    out: dict[str, float] = {}
    for (n, labels), v in s.items():
        lab = dict(labels)
        if n == W + name + "_bucket" and lab["reporter"] == reporter:
            out[lab["le"]] = out.get(lab["le"], 0) + v
    return out


def between(s: Samples, name: str, reporter: str, low: str, high: str) -> tuple[float, float]:
    """(observations in (low, high], all observations)."""
    b = buckets(s, name, reporter)
    return b[high] - (b[low] if low else 0), b["+Inf"]


def test_rtt_of_a_local_path_lands_in_sub_millisecond_buckets(
    daemon: Daemon, pods: dict[str, Pod]
) -> None:
    """Between two pods on one bridge, smoothed and minimum RTT and the handshake are all
    under a millisecond (not 8 times the RTT: the kernel keeps srtt << 3)."""
    exchange(pods, [(292, 5, 0)] * 5)
    s = daemon.wait_for(closed(5), what="5 closed")
    for name, reporters in (
        ("srtt_seconds", REPORTERS),
        ("min_rtt_seconds", REPORTERS),
        ("connect_duration_seconds", ("source",)),
    ):
        for reporter in reporters:
            assert between(s, name, reporter, "", "0.001") == (5, 5), (name, reporter)
    assert buckets(s, "connect_duration_seconds", "destination") == {}


@contextmanager
def delayed_pods(delay_ms: float) -> Iterator[dict[str, Pod]]:
    """Two pods joined only through tests/delay.py: every packet waits delay_ms each way."""
    tag = uuid.uuid4().hex[:6]
    pods = {
        "client": Pod("client", f"kmd{tag}c", "10.244.78.2", "fd00:78::2"),
        "server": Pod("server", f"kmd{tag}s", "10.244.78.3", "fd00:78::3"),
    }
    forwarder = None
    try:
        for pod in pods.values():
            sh("ip", "netns", "add", pod.netns)
            pod.run("ip", "link", "set", "lo", "up")
        forwarder = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("delay.py")),
             "--ns", pods["client"].netns, "--ns", pods["server"].netns,
             "--delay-ms", str(delay_ms)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert forwarder.stdout is not None
        assert forwarder.stdout.readline().strip() == "ready"
        for me, peer in (("client", "server"), ("server", "client")):
            pod = pods[me]
            pod.run("ip", "addr", "add", pod.ip4, "peer", pods[peer].ip4, "dev", "kmdelay0")
            pod.run("ip", "link", "set", "kmdelay0", "up")
        yield pods
    finally:
        if forwarder is not None:
            forwarder.kill()
            forwarder.wait()
        for pod in pods.values():
            sh("ip", "netns", "del", pod.netns, check=False)


DELAYED_INVENTORY = INVENTORY.replace("10.244.77.", "10.244.78.")


def test_rtt_under_a_20ms_delay_each_way_lands_around_40ms(tmp_path: Path, pin_dir: Path) -> None:
    """20 ms each way: srtt, min RTT and the handshake of every connection fall in the
    (25 ms, 50 ms] bucket, for both reporters (the handshake: the source only)."""
    daemon = Daemon(tmp_path, DELAYED_INVENTORY, pin_dir)
    daemon.start()
    try:
        with delayed_pods(20) as pods:
            exchange(pods, [(292, 5, 0), (292, 5, 1), (2000, 50_000, 0)])
            s = daemon.wait_for(closed(3), what="3 closed")
        for name, reporters in (
            ("srtt_seconds", REPORTERS),
            ("min_rtt_seconds", REPORTERS),
            ("connect_duration_seconds", ("source",)),
        ):
            for reporter in reporters:
                assert between(s, name, reporter, "0.025", "0.05") == (3, 3), (name, reporter)
        # The sum says the same: 40 ms and a little, per connection.
        srtt_sum = value(s, W + "srtt_seconds_sum", reporter="source")
        assert 3 * 0.040 <= srtt_sum <= 3 * 0.050
    finally:
        daemon.close()


def test_random_loss_shows_as_retransmits_and_a_loss_counter_that_only_grows(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """5% of the client's segments dropped at random on a bulk transfer: retransmits and
    lost segments rise while it runs, never fall, and the bytes stay exact."""
    pods["server"].run(
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "80",
        "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP",
    )  # fmt: skip
    daemon = Daemon(tmp_path, INVENTORY, pin_dir)
    daemon.start()
    try:
        stream = Stream(pods["client"], pods["server"], chunks=16, reply=5)
        lost: list[float] = []
        for _ in range(16):
            stream.send()
            lost.append(value(daemon.samples(), W + "packets_lost_total", reporter="source"))
        stream.close()
        s = daemon.wait_for(closed(1), what="the close")
        lost.append(value(s, W + "packets_lost_total", reporter="source"))
        assert value(s, W + "retransmits_total", reporter="source") > 0
        assert lost == sorted(lost) and lost[-1] > 0
        assert both(s, "received_bytes_total") == [stream.request] * 2
        assert both(s, "sent_bytes_total") == [5, 5]
    finally:
        daemon.close()
