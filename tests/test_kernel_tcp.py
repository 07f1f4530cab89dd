"""Beyond the seed's counters, with real eBPF and namespaces as pods: live bytes of long
connections, active connections, resets, failure reasons, RTT under a known delay, loss."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import pytest

from tests.bench import loadgen
from tests.bench.probes import bpf_stats, prog_stats
from tests.daemon_proc import DaemonProcess, Samples, parse_metrics, value
from tests.e2e import INVENTORY, REPORTERS, W, both, closed, exchange, hold, release, serve
from tests.netns import Pod, is_root, sh

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not is_root(), reason="real eBPF needs root"),
]

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


def test_a_long_connection_shows_its_bytes_while_open_and_exactly_at_close(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """256 KiB a second (64 KiB every 250 ms) for 5 intervals of 1 s. At every scrape both
    reporters show at least what was acknowledged interval + 1 s before and never more
    than now, every publish shows more, and the close adds only the rest, exactly."""
    interval, piece = 1.0, 64 * 1024
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, interval="1s")
    daemon.start()
    try:
        stream = Stream(pods["client"], pods["server"], chunks=5, reply=5)
        truth = [(time.monotonic(), stream.acked)]  # (when acknowledged, total so far)
        by_publish: dict[float, list[float]] = {}
        next_send = time.monotonic()
        while stream.acked < stream.request:
            if time.monotonic() >= next_send:
                stream.send(piece)
                truth.append((time.monotonic(), stream.acked))
                next_send += 0.25
            s = daemon.samples()
            due = max(
                (total for t, total in truth if t <= time.monotonic() - interval - 1.0), default=0
            )
            shown = both(s, "received_bytes_total")
            assert all(due <= v <= stream.acked for v in shown), (due, shown, stream.acked)
            by_publish[value(s, "kmeshd_last_publish_timestamp_seconds")] = shown
            assert both(s, "connections_opened_total") in ([0, 0], [1, 1])  # before a publish
            assert both(s, "connections_closed_total") == [0, 0]
            time.sleep(0.05)
        assert both(s, "connections_opened_total") == [1, 1]
        # Publishes while bytes moved (the first may predate them): each shows more.
        growing = [min(v) for _, v in sorted(by_publish.items())][1:]
        assert len(growing) >= 4 and growing == sorted(set(growing)), by_publish
        stream.close()
        s = daemon.wait_for(closed(1), what="the close")
        assert both(s, "received_bytes_total") == [stream.request, stream.request]
        assert both(s, "sent_bytes_total") == [5, 5]
        assert stream.request == 9 + 5 * CHUNK
    finally:
        daemon.close()


def test_a_bulk_transfer_runs_the_probe_per_connection_not_per_packet(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """The program runs for 128 MiB in one connection as often as for any connection of
    two tracked sockets (17 times: see README "Overhead"), plus what other TCP sockets on
    the host cause meanwhile (nothing scrapes /metrics during the transfer; the bound
    leaves room for a few); the bytes are exact. A callback on each packet the server
    receives, even with GRO merging them into large ones on the veth, made it 477 runs
    when tried."""
    size = 128 * 1024 * 1024
    with bpf_stats():
        before = prog_stats().runs  # kmeshd's sock_ops program, as bpftool lists it
        exchange(pods, [(size, 5, 1)])
        runs = prog_stats().runs - before
    s = daemon.wait_for(closed(1), what="the close")
    assert both(s, "received_bytes_total") == [size, size]
    assert both(s, "sent_bytes_total") == [5, 5]
    assert 17 <= runs <= 100, runs


def test_a_burst_then_silence_shows_every_byte_at_the_next_publish(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """1 MiB sent at once, then nothing, the connection left open: the next publish shows
    every byte the server acknowledged, exactly, for both reporters, and so does each one
    after (no segment moves, so nothing may be added twice by repeated sweeps)."""
    interval = 1.0
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, interval="1s")
    daemon.start()
    try:
        stream = Stream(pods["client"], pods["server"], chunks=4, reply=0)
        stream.send(4 * CHUNK)
        acked_at = time.monotonic()
        exact = [stream.request] * 2
        s = daemon.wait_for(
            lambda s: both(s, "received_bytes_total") == exact, timeout=interval + 1.0
        )
        assert time.monotonic() - acked_at <= interval + 1.0
        published = value(s, "kmeshd_last_publish_timestamp_seconds")
        s = daemon.wait_for(
            lambda s: value(s, "kmeshd_last_publish_timestamp_seconds") >= published + 2 * interval
        )
        assert both(s, "received_bytes_total") == exact
        assert both(s, "sent_bytes_total") == [0, 0]  # the server only acknowledges
        assert both(s, "connections_closed_total") == [0, 0]
        stream.close()
        s = daemon.wait_for(closed(1), what="the close")
        assert both(s, "received_bytes_total") == exact
        assert both(s, "sent_bytes_total") == [0, 0]
    finally:
        daemon.close()


def test_without_live_updates_bytes_arrive_at_close_only(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """bpf.live_updates = false: an open connection's bytes stay out of the counters for
    publish after publish, then its close brings them all, exactly."""
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, bpf="live_updates = false")
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


def test_periodic_records_show_an_open_connection_in_the_access_log(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """accesslog.periodic = "1s": while a connection sends, each socket writes a record of
    its totals so far about once a second, marked report=periodic, growing; the close
    writes the usual record with the exact totals."""
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, accesslog='periodic = "1s"')
    daemon.start()
    try:
        stream = Stream(pods["client"], pods["server"], chunks=4, reply=5)
        acked = []
        for _ in range(4):
            time.sleep(1.1)
            stream.send()
            acked.append(stream.acked)
        stream.close()
        daemon.wait_for(closed(1), what="the close")
        deadline = time.monotonic() + 10
        while len([r for r in daemon.access_log() if "report" not in r]) < 2:
            assert time.monotonic() < deadline, daemon.access_log()
            time.sleep(0.1)
        records = daemon.access_log()
        for direction in ("OUTBOUND", "INBOUND"):
            mine = [r for r in records if r["direction"] == direction]
            periodic = [r for r in mine if r.get("report") == "periodic"]
            final = [r for r in mine if "report" not in r]
            assert len(final) == 1 and (final[0]["received_bytes"], final[0]["sent_bytes"]) == (
                stream.request,
                5,
            )
            assert 1 <= len(periodic) <= 4, periodic  # about one a second, only when moving
            # Totals so far, taken while bytes moved: growing, never past the real total.
            received = [r["received_bytes"] for r in periodic]
            assert received == sorted(received) and 9 <= received[0] <= received[-1] <= acked[-1]
            durations = [r["duration_ns"] for r in periodic]
            assert durations == sorted(durations) and durations[-1] < final[0]["duration_ns"]
    finally:
        daemon.close()


def test_restart_with_a_connection_open_counts_it_once_and_never_goes_back(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """kmeshd restarts while a connection is open and sending: opened stays 1, bytes sent
    while no daemon ran arrive with the next update, no counter ever decreases."""
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir)
    daemon.start()
    seen: list[list[float]] = []
    stream = Stream(pods["client"], pods["server"], chunks=4, reply=7)
    try:
        stream.send()
        s = daemon.wait_for(lambda s: min(both(s, "received_bytes_total")) >= 9, what="live")
        seen.append(both(s, "received_bytes_total"))
        assert daemon.stop() == 0
        stream.send()  # nothing attached: the socket's state waits in the pinned map
        daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir)
        daemon.start()
        seen.append(both(daemon.samples(), "received_bytes_total"))
        before = stream.acked
        stream.send()
        # Live again, exactly: what was sent before and while no daemon ran.
        s = daemon.wait_for(lambda s: both(s, "received_bytes_total") == [before] * 2, what="live")
        seen.append(both(s, "received_bytes_total"))
        stream.send()
        stream.close()
        s = daemon.wait_for(closed(1), what="the close")
        seen.append(both(s, "received_bytes_total"))
        assert both(s, "connections_opened_total") == [1, 1]
        assert both(s, "received_bytes_total") == [stream.request] * 2
        assert both(s, "sent_bytes_total") == [7, 7]
        assert all(a <= b for x, y in pairwise(seen) for a, b in zip(x, y, strict=True))
    finally:
        daemon.close()


def test_active_connections_count_what_is_open_now(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
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
    daemon: DaemonProcess, pods: dict[str, Pod]
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


# The RTT-like histograms and the reporters that observe them (the handshake: the client).
RTT_HISTOGRAMS = (
    ("srtt_seconds", REPORTERS),
    ("min_rtt_seconds", REPORTERS),
    ("connect_duration_seconds", ("source",)),
)


def assert_rtts_between(s: Samples, low: str, high: str, n: int) -> None:
    """All n observations of every RTT histogram, for each reporter, in (low, high]."""
    for name, reporters in RTT_HISTOGRAMS:
        for reporter in reporters:
            assert between(s, name, reporter, low, high) == (n, n), (name, reporter)


def test_rtt_of_a_local_path_lands_in_sub_millisecond_buckets(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """Between two pods on one bridge, smoothed and minimum RTT and the handshake are all
    under a millisecond (not 8 times the RTT: the kernel keeps srtt << 3)."""
    exchange(pods, [(292, 5, 0)] * 5)
    s = daemon.wait_for(closed(5), what="5 closed")
    assert_rtts_between(s, "", "0.001", 5)
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
    daemon = DaemonProcess(tmp_path, DELAYED_INVENTORY, pin_dir)
    daemon.start()
    try:
        with delayed_pods(20) as pods:
            exchange(pods, [(292, 5, 0), (292, 5, 1), (2000, 50_000, 0)])
            s = daemon.wait_for(closed(3), what="3 closed")
        assert_rtts_between(s, "0.025", "0.05", 3)
        # The sum says the same: 40 ms and a little, per connection.
        srtt_sum = value(s, W + "srtt_seconds_sum", reporter="source")
        assert 3 * 0.040 <= srtt_sum <= 3 * 0.050
        # Each connection lived at least one round trip (request out, reply back) and, on
        # this idle path, well under a second.
        for reporter in REPORTERS:
            assert between(s, "connection_duration_seconds", reporter, "0.01", "1.0") == (3, 3)
            assert value(s, W + "connection_duration_seconds_sum", reporter=reporter) >= 0.12
    finally:
        daemon.close()


def test_packet_loss_shows_as_retransmits_and_a_loss_counter_that_only_grows(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """Every 20th of the client's packets dropped on a bulk transfer: retransmits and lost
    segments rise while it runs, never fall, and the bytes stay exact. (Every nth rather
    than at random: GSO hands iptables ~64 packets for 4 MiB, and 5% at random misses
    them all about once in 27 runs.)"""
    pods["server"].run(
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "80",
        "-m", "statistic", "--mode", "nth", "--every", "20", "--packet", "0", "-j", "DROP",
    )  # fmt: skip
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir)
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


# The ring buffer holds 4 MiB of 104-byte records (96 + the kernel's 8-byte header).
RING_RECORDS = 4 * 1024 * 1024 // 104


def test_records_the_ring_cannot_take_are_counted_and_metrics_stay_exact(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """More closes than the ring buffer holds while the daemon reads one record a second
    (accesslog.max_rate = 1): the records the kernel could not queue are counted in
    kmeshd_events_lost_total, and written + lost is exactly one record per socket; the
    metrics count every connection and byte whatever the access log lost."""
    client, server = pods["client"], pods["server"]
    gen = loadgen.Loadgen(loadgen.build(tmp_path), loadgen.Load(4, 2, 100, 7))
    target = loadgen.Target(client.netns, server.netns, server.ip4, 80)
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, max_rate=1)
    daemon.start()
    try:
        connections = 0
        with gen.serving(target):
            while 2 * connections < RING_RECORDS * 1.25:
                churn = gen.churn(target, 1.0)
                assert churn.errors == 0
                connections += churn.connections
        s = daemon.wait_for(closed(connections), timeout=30, what="every connection closed")
        for reporter in REPORTERS:
            assert value(s, W + "connections_opened_total", reporter=reporter) == connections
            assert value(s, W + "received_bytes_total", reporter=reporter) == 100 * connections
            assert value(s, W + "sent_bytes_total", reporter=reporter) == 7 * connections
        assert daemon.stop() == 0  # the final drain writes what the ring holds, past the budget
    finally:
        daemon.close()
    final = parse_metrics(daemon.textfile.read_text())
    lost = value(final, "kmeshd_events_lost_total")
    written = len(daemon.access_log())
    assert lost > 0
    assert written + lost == 2 * connections
    assert value(final, "kmeshd_accesslog_records_total") == written
    assert value(final, "kmeshd_accesslog_records_dropped_total", sink="file") == 0
