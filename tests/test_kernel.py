"""End to end with real eBPF: network namespaces as pods, the real daemon, exact numbers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmeshd.kernel import cgroup
from kmeshd.kernel.pins import remove_pins
from tests.daemon_proc import DaemonProcess, Samples, parse_metrics, value
from tests.e2e import (
    CLIENT,
    INVENTORY,
    SERVER,
    SERVICE,
    W,
    attached_probes,
    closed,
    exchange,
    hold,
    release,
    run_plan,
    serve,
    socket_states,
    wait_records,
)
from tests.netns import Pod, is_root, sh

REASONS = ("refused", "timeout", "other")
BPF_F_ALLOW_MULTI = 2

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not is_root(), reason="real eBPF needs root"),
]


def test_292_byte_request_5_byte_reply_counts_exactly_for_both_reporters(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """A 292-byte request answered by 5 bytes is received 292 / sent 5 for both reporters."""
    exchange(pods, [(292, 5, 0)])
    s = daemon.wait_for(closed(1), what="one closed connection")
    for reporter in ("source", "destination"):
        labels = {
            "reporter": reporter,
            "source_workload": "sleep",
            "destination_workload": "httpbin",
        }
        assert value(s, W + "received_bytes_total", **labels) == 292
        assert value(s, W + "sent_bytes_total", **labels) == 5
        assert value(s, W + "connections_opened_total", **labels) == 1
        assert value(s, W + "connections_closed_total", **labels) == 1
        assert value(s, W + "connections_failed_total", **labels) == 0
        assert (
            value(s, "kmesh_tcp_received_bytes_total", destination_service=SERVICE, **labels) == 292
        )
        assert value(s, "kmesh_tcp_sent_bytes_total", destination_service=SERVICE, **labels) == 5
    pod_labels = {"destination_pod_address": "10.244.77.3", "destination_pod_name": SERVER}
    assert value(s, W + "received_bytes_total", **pod_labels) == 2 * 292
    records = wait_records(daemon, 2)
    by_direction = {r["direction"]: r for r in records}
    assert set(by_direction) == {"INBOUND", "OUTBOUND"}
    for r in records:
        assert (r["sent_bytes"], r["received_bytes"]) == (5, 292)
        assert r["src.workload"] == CLIENT and r["dst.workload"] == SERVER
        assert r["dst.service"] == SERVICE and r["dst.addr"] == "10.244.77.3:80"
        assert r["src.namespace"] == r["dst.namespace"] == "default"
        assert "failure_reason" not in r


def test_refused_connect_counts_one_failed(daemon: DaemonProcess, pods: dict[str, Pod]) -> None:
    """A connect answered by RST counts one failed (source only), nothing opened or closed."""
    out = pods["client"].run(
        *pods["client"].traffic("fail", "--host", pods["server"].ip4, "--port", "80")
    )
    assert json.loads(out.stdout) == {"error": "ECONNREFUSED"}
    s = daemon.wait_for(lambda s: value(s, W + "connections_failed_total") >= 1, what="failed")
    time.sleep(0.5)  # a second publish must not add anything
    s = daemon.samples()
    assert (
        value(s, W + "connections_failed_total", reporter="source", destination_workload="httpbin")
        == 1
    )
    assert value(s, W + "connections_failed_total", reporter="destination") == 0
    assert value(s, W + "connections_opened_total") == 0
    assert value(s, W + "connections_closed_total") == 0
    reasons = {r: value(s, W + "connect_failures_total", reason=r) for r in REASONS}
    assert reasons == {"refused": 1, "timeout": 0, "other": 0}
    [record] = wait_records(daemon, 1)
    assert record["failure_reason"] == "refused"
    assert record["direction"] == "OUTBOUND"
    assert (record["sent_bytes"], record["received_bytes"]) == (0, 0)


def test_timed_out_connect_counts_one_failed(daemon: DaemonProcess, pods: dict[str, Pod]) -> None:
    """A SYN that is never answered (blackhole, one SYN retry) counts one failed: timeout."""
    client, server = pods["client"], pods["server"]
    server.run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "81", "-j", "DROP")
    client.run("sysctl", "-qw", "net.ipv4.tcp_syn_retries=1")
    out = client.run(*client.traffic("fail", "--host", server.ip4, "--port", "81"))
    assert json.loads(out.stdout) == {"error": "ETIMEDOUT"}
    s = daemon.wait_for(lambda s: value(s, W + "connections_failed_total") >= 1, what="failed")
    time.sleep(0.5)  # a second publish must not add anything
    s = daemon.samples()
    assert (
        value(s, W + "connections_failed_total", reporter="source", destination_workload="httpbin")
        == 1
    )
    assert value(s, W + "connections_failed_total", reporter="destination") == 0
    assert value(s, W + "connections_opened_total") == 0
    assert value(s, W + "connections_closed_total") == 0
    reasons = {r: value(s, W + "connect_failures_total", reason=r) for r in REASONS}
    assert reasons == {"refused": 0, "timeout": 1, "other": 0}
    [record] = wait_records(daemon, 1)
    assert record["failure_reason"] == "timeout"
    assert record["direction"] == "OUTBOUND" and record["dst.addr"] == "10.244.77.3:81"
    assert (record["sent_bytes"], record["received_bytes"]) == (0, 0)


def random_plan(n: int, seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    sizes = [9, 10, 1000, 65536, 300_000]
    plan = []
    for _ in range(n):
        request = rng.choice([rng.randint(9, 5000), rng.choice(sizes), rng.randint(9, 400_000)])
        reply = rng.choice([0, 1, rng.randint(0, 5000), rng.randint(0, 400_000)])
        plan.append((request, reply, rng.randint(0, 1)))
    return plan


def test_200_connections_of_random_sizes_sum_exactly(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """200 connections with random sizes and closing orders sum exactly, both reporters."""
    plan = random_plan(200, seed=20261202)
    exchange(pods, plan)
    s = daemon.wait_for(closed(200), what="200 closed connections")
    for reporter in ("source", "destination"):
        assert value(s, W + "received_bytes_total", reporter=reporter) == sum(p[0] for p in plan)
        assert value(s, W + "sent_bytes_total", reporter=reporter) == sum(p[1] for p in plan)
        assert value(s, W + "connections_opened_total", reporter=reporter) == 200
        assert value(s, W + "connections_closed_total", reporter=reporter) == 200
    records = wait_records(daemon, 400)
    outbound = sorted(
        (r["received_bytes"], r["sent_bytes"]) for r in records if r["direction"] == "OUTBOUND"
    )
    assert outbound == sorted((p[0], p[1]) for p in plan)


def test_ipv6_connection_is_reported(daemon: DaemonProcess, pods: dict[str, Pod]) -> None:
    """An IPv6 connection between pods is counted for each reporter and logged with
    bracketed addresses, bytes exact in both."""
    exchange(pods, [(1234, 567, 1)], ipv6=True)
    s = daemon.wait_for(closed(1), what="an IPv6 connection")
    time.sleep(0.5)  # a second publish must not add anything
    s = daemon.samples()
    for reporter in ("source", "destination"):
        labels = {"reporter": reporter, "destination_pod_address": "fd00:77::3"}
        assert value(s, W + "received_bytes_total", **labels) == 1234
        assert value(s, W + "sent_bytes_total", **labels) == 567
        assert value(s, W + "connections_opened_total", **labels) == 1
        assert value(s, W + "connections_closed_total", **labels) == 1
        assert value(s, "kmesh_tcp_received_bytes_total", reporter=reporter) == 1234
    records = wait_records(daemon, 2)
    assert sorted(r["direction"] for r in records) == ["INBOUND", "OUTBOUND"]
    for r in records:
        assert r["dst.addr"] == "[fd00:77::3]:80" and r["src.addr"].startswith("[fd00:77::2]:")
        assert (r["src.workload"], r["dst.workload"]) == (CLIENT, SERVER)
        assert (r["sent_bytes"], r["received_bytes"]) == (567, 1234)


def test_ipv4_client_of_a_dual_stack_server_shows_ipv4(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """A server on [::] accepts an IPv4 client on an AF_INET6 socket, with v4-mapped
    addresses (::ffff:10.244.77.2): both reporters show plain IPv4 and one identity."""
    server = serve(pods["server"], 1, bind="::")
    run_plan(pods["client"], pods["server"].ip4, [(292, 5, 0)])
    assert server.wait(timeout=30) == 0
    s = daemon.wait_for(closed(1), what="one closed connection")
    for reporter in ("source", "destination"):
        labels = {"reporter": reporter, "destination_pod_address": "10.244.77.3"}
        assert value(s, W + "received_bytes_total", source_workload="sleep", **labels) == 292
        assert value(s, W + "sent_bytes_total", source_workload="sleep", **labels) == 5
    assert value(s, W + "received_bytes_total") == 2 * 292  # no series under ::ffff: addresses
    records = wait_records(daemon, 2)
    assert sorted(r["direction"] for r in records) == ["INBOUND", "OUTBOUND"]
    for r in records:
        assert r["dst.addr"] == "10.244.77.3:80" and r["src.addr"].startswith("10.244.77.2:")
        assert (r["src.workload"], r["dst.workload"]) == (CLIENT, SERVER)


def assert_exchanged(s: Samples, n: int) -> None:
    """n connections of 100 bytes out and 10 back, counted exactly by both reporters."""
    for reporter in ("source", "destination"):
        assert value(s, W + "connections_opened_total", reporter=reporter) == n
        assert value(s, W + "connections_closed_total", reporter=reporter) == n
        assert value(s, W + "received_bytes_total", reporter=reporter) == 100 * n
        assert value(s, W + "sent_bytes_total", reporter=reporter) == 10 * n


def test_sigkilled_daemon_restarted_does_not_double_count(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """After SIGKILL the next start replaces the old program: counts continue, never doubled."""
    before = attached_probes()
    first = DaemonProcess(tmp_path, INVENTORY, pin_dir)
    first.start()
    exchange(pods, [(100, 10, 0)] * 3)
    first.wait_for(closed(3), what="3 closed")
    first.kill()
    assert attached_probes() == before + 1  # the pinned link kept it attached
    exchange(pods, [(100, 10, 1)] * 2)  # counted by the orphaned program, in pinned maps
    second = DaemonProcess(tmp_path, INVENTORY, pin_dir)
    second.start()
    try:
        assert attached_probes() == before + 1
        exchange(pods, [(100, 10, 0)] * 4)
        s = second.wait_for(closed(9), what="9 closed")
        time.sleep(0.5)
        s = second.samples()
        assert_exchanged(s, 9)
        assert second.stop() == 0
        assert attached_probes() == before
    finally:
        second.close()


def test_counts_the_kernel_forgot_carry_over_a_sigkill_and_restart(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """With a 1 s flow_expiry the kernel forgets the first connections' entries (folded
    into the daemon's counters, saved to metrics.state_file); after SIGKILL, with more
    counted meanwhile by the orphaned program, the next daemon goes on from the saved
    counters: nothing lost, nothing counted twice."""
    bpf = 'flow_expiry = "1s"'
    first = DaemonProcess(tmp_path, INVENTORY, pin_dir, bpf=bpf)
    first.start()
    exchange(pods, [(100, 10, 0)] * 3)
    first.wait_for(
        lambda s: value(s, W + "connections_closed_total", reporter="source") == 3
        and value(s, "kmeshd_bpf_map_entries", map="flows") == 0,
        what="3 closed and their entries retired",
    )
    exchange(pods, [(100, 10, 0)] * 2)
    first.wait_for(closed(5), what="5 closed")
    first.kill()
    exchange(pods, [(100, 10, 1)] * 2)  # counted by the orphaned program
    second = DaemonProcess(tmp_path, INVENTORY, pin_dir, bpf=bpf)
    second.start()
    try:
        exchange(pods, [(100, 10, 0)] * 4)
        second.wait_for(closed(11), what="11 closed")
        time.sleep(2.5)  # two more retires: nothing moves
        s = second.samples()
        assert_exchanged(s, 11)
        assert value(s, "kmeshd_state_save_failures_total") == 0
        assert "counters from the last run:" in second.stderr()
    finally:
        second.close()


def one_closed_while_stopped(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> tuple[list[subprocess.Popen[str]], subprocess.Popen[str]]:
    """Two connections opened under a kmeshd that then stops; the first closes while none
    runs, so its state is left in the map. Returns the servers and the open connection."""
    server, client = pods["server"], pods["client"]
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir)
    daemon.start()
    servers = [serve(server, 1, port=80), serve(server, 1, port=81)]
    gone = hold(client, server.ip4, 300, 30, port=80)
    kept = hold(client, server.ip4, 200, 20, port=81)
    assert socket_states(pin_dir) == 4  # client and server socket of each
    assert daemon.stop() == 0
    release(gone)  # no program attached: nothing deletes its state
    assert socket_states(pin_dir) == 4
    return servers, kept


def test_state_of_open_sockets_survives_a_clean_restart_and_closed_ones_are_swept(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """A connection open across stop/start is counted once, with exact bytes; one that
    closed while kmeshd was stopped is swept at the next start and counted as closed, so
    the active gauge does not keep it open forever."""
    servers, kept = one_closed_while_stopped(tmp_path, pin_dir, pods)
    second = DaemonProcess(tmp_path, INVENTORY, pin_dir)
    second.start()
    try:
        assert socket_states(pin_dir) == 2
        s = second.wait_for(closed(1), what="the swept connection counted closed")
        assert value(s, "kmeshd_connections_closed_unobserved_total") == 2  # both its sockets
        for reporter in ("source", "destination"):
            assert value(s, W + "connections_active", reporter=reporter) == 1
        release(kept)
        s = second.wait_for(closed(2), what="the kept connection closed")
        for reporter in ("source", "destination"):
            assert value(s, W + "connections_opened_total", reporter=reporter) == 2
            assert value(s, W + "connections_closed_total", reporter=reporter) == 2
            # Both connections' bytes arrived live, before the stop: none lost, none twice.
            assert value(s, W + "received_bytes_total", reporter=reporter) == 500
            assert value(s, W + "sent_bytes_total", reporter=reporter) == 50
            assert value(s, W + "connections_active", reporter=reporter) == 0
        assert socket_states(pin_dir) == 0
        assert [p.wait(timeout=10) for p in servers] == [0, 0]
    finally:
        second.close()


def test_sweep_sockets_forgets_only_sockets_that_closed(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """`kmeshd sweep-sockets` (the unit's privileged ExecStartPost) removes the state of a
    connection that closed while kmeshd was stopped and keeps the open one's."""
    servers, kept = one_closed_while_stopped(tmp_path, pin_dir, pods)
    config = DaemonProcess(tmp_path, INVENTORY, pin_dir).config

    def sweep() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "kmeshd.cli", "sweep-sockets", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout.strip()

    assert sweep() == f"{pin_dir}: forgot 2 sockets that closed while kmeshd was stopped"
    assert socket_states(pin_dir) == 2
    assert sweep() == f"{pin_dir}: forgot 0 sockets that closed while kmeshd was stopped"
    release(kept)
    assert [p.wait(timeout=10) for p in servers] == [0, 0]
    remove_pins(pin_dir)
    assert sweep() == f"{pin_dir}: no kmeshd maps pinned there; nothing to sweep"


def test_a_probe_of_an_older_layout_is_removed_at_start(tmp_path: Path, pin_dir: Path) -> None:
    """An upgrade never leaves the old program counting beside the new one."""
    import bcc

    from kmeshd.kernel.attach import BPF_CGROUP_SOCK_OPS
    from kmeshd.kernel.libbpf import LibBpf

    before = attached_probes()
    old = pin_dir / "v1"
    old.mkdir(parents=True)
    b = bcc.BPF(text=b"int kmeshd_sockops(struct bpf_sock_ops *ctx) { return 1; }")
    fn = b.load_func(b"kmeshd_sockops", bcc.BPF.SOCK_OPS)
    libbpf = LibBpf()
    fd = os.open(cgroup.directory("auto", "test"), os.O_RDONLY)
    link = libbpf.check(libbpf.link_create(fn.fd, fd, BPF_CGROUP_SOCK_OPS, None), "link")
    os.close(fd)
    libbpf.check(libbpf.obj_pin(link, str(old / "link").encode()), "pin")
    os.close(link)
    b.cleanup()
    assert attached_probes() == before + 1
    d = DaemonProcess(tmp_path, INVENTORY, pin_dir)
    d.start()
    try:
        assert not old.exists()
        assert attached_probes() == before + 1
        assert d.stop() == 0
        assert attached_probes() == before
    finally:
        d.close()


def test_start_up_reports_each_phase(daemon: DaemonProcess) -> None:
    """STATUS= at each phase, more start time asked for before bcc compiles, READY=1 last."""
    lines = [line for message in daemon.notifications for line in message.split("\n")]
    cgroup_dir = cgroup.directory("auto", "test")
    listen = f"127.0.0.1:{daemon.port}"
    assert lines == [
        "STATUS=loading identities",
        f"STATUS=listening on {listen}",
        "EXTEND_TIMEOUT_USEC=30000000",
        "STATUS=compiling the BPF probe",
        f"STATUS=attaching the probe to {cgroup_dir}",
        "STATUS=waiting for the identity sources",
        "READY=1",
        f"STATUS=probe attached to {cgroup_dir}; /metrics on {listen}; identities from the"
        " inventory",
    ]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_publishes_detaches_and_exits_zero(
    daemon: DaemonProcess, pods: dict[str, Pod], sig: signal.Signals
) -> None:
    """SIGTERM or SIGINT: final textfile written, program detached, exit 0 within a few
    seconds."""
    before = attached_probes()
    exchange(pods, [(50, 5, 0)])
    started = time.monotonic()
    assert daemon.stop(sig) == 0
    assert time.monotonic() - started < 5
    assert attached_probes() == before - 1
    final = parse_metrics(daemon.textfile.read_text())  # the last publish saw the connection
    assert value(final, W + "received_bytes_total", reporter="source") == 50
    assert value(final, W + "sent_bytes_total", reporter="destination") == 5


def test_other_sock_ops_programs_can_attach_below(daemon: DaemonProcess, tmp_path: Path) -> None:
    """With kmeshd on the root, a program without ALLOW_MULTI still attaches in a child cgroup."""
    import bcc

    root = cgroup.directory("auto", "test")
    child = root / f"kmeshd-test-{uuid.uuid4().hex[:6]}"
    child.mkdir()
    b = bcc.BPF(text=b"int other(struct bpf_sock_ops *ctx) { return 1; }")
    fn = b.load_func(b"other", bcc.BPF.SOCK_OPS)
    fd = os.open(child, os.O_RDONLY)
    try:
        b.attach_func(fn, fd, bcc.BPFAttachType.CGROUP_SOCK_OPS)
        b.detach_func(fn, fd, bcc.BPFAttachType.CGROUP_SOCK_OPS)
    finally:
        os.close(fd)
        b.cleanup()
        child.rmdir()


OTHER_SOCK_OPS = b"""
BPF_ARRAY(seen, u64, 2);
int other(struct bpf_sock_ops *ctx)
{
    int i = -1;
    if (ctx->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && bpf_ntohl(ctx->remote_port) == 80)
        i = 0;
    if (ctx->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && ctx->local_port == 80)
        i = 1;
    u64 *n = seen.lookup(&i);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 1;
}
"""


def test_another_sock_ops_program_on_the_root_keeps_working(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """A second program attached to the root cgroup beside kmeshd (BPF_F_ALLOW_MULTI) sees
    every connection, and kmeshd still counts them all: neither displaces the other."""
    import bcc

    root = cgroup.directory("auto", "test")
    probes = attached_probes()
    b = bcc.BPF(text=OTHER_SOCK_OPS)
    fn = b.load_func(b"other", bcc.BPF.SOCK_OPS)
    fd = os.open(root, os.O_RDONLY)
    try:
        b.attach_func(fn, fd, bcc.BPFAttachType.CGROUP_SOCK_OPS, BPF_F_ALLOW_MULTI)
        try:
            exchange(pods, [(100, 10, 0), (200, 20, 1), (300, 30, 0)])
            seen = b[b"seen"]
            assert (seen[seen.Key(0)].value, seen[seen.Key(1)].value) == (3, 3)
        finally:
            b.detach_func(fn, fd, bcc.BPFAttachType.CGROUP_SOCK_OPS)
    finally:
        os.close(fd)
        b.cleanup()
    s = daemon.wait_for(closed(3), what="three closed connections")
    for reporter in ("source", "destination"):
        assert value(s, W + "connections_opened_total", reporter=reporter) == 3
        assert value(s, W + "received_bytes_total", reporter=reporter) == 600
    assert attached_probes() == probes


def test_sighup_reopens_the_access_log_and_keeps_counters(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """SIGHUP (logrotate): new records go to a new file, old ones stay, counters don't drop."""
    exchange(pods, [(100, 1, 0)])
    daemon.wait_for(closed(1), what="first connection")
    wait_records(daemon, 2)
    rotated = daemon.accesslog.with_name("accesslog.json.1")
    daemon.accesslog.rename(rotated)
    daemon.send(signal.SIGHUP)
    time.sleep(0.5)
    exchange(pods, [(200, 2, 1)])
    s = daemon.wait_for(closed(2), what="second connection")
    assert value(s, W + "received_bytes_total", reporter="source") == 300
    assert len(wait_records(daemon, 2)) == 2  # the new file
    assert {json.loads(line)["received_bytes"] for line in rotated.read_text().splitlines()} == {
        100
    }


def test_reload_with_broken_config_keeps_running(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """A broken config on SIGHUP is rejected with reasons; the old one keeps working."""
    daemon.config.write_text(daemon.config.read_text().replace('"200ms"', '"soon"'))
    daemon.send(signal.SIGHUP)
    time.sleep(0.5)
    assert daemon.proc is not None and daemon.proc.poll() is None
    problem = f'{daemon.config}: metrics.interval: "soon" is not a duration'
    assert f"reload rejected, keeping the running config: {problem}" in daemon.stderr()
    exchange(pods, [(64, 4, 0)])
    s = daemon.wait_for(closed(1), what="a connection after the rejected reload")
    assert value(s, W + "received_bytes_total", reporter="destination") == 64


def test_reload_moves_new_counts_to_the_new_owner_only(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """An inventory change on SIGHUP relabels new traffic; the old series keeps its value."""
    exchange(pods, [(100, 10, 0)])
    daemon.wait_for(closed(1), what="first connection")
    inventory = daemon.workdir / "inventory.toml"
    inventory.write_text(
        inventory.read_text()
        .replace('workload = "httpbin"', 'workload = "httpbin2"')
        .replace('workloads = ["httpbin"]', 'workloads = ["httpbin2"]')
    )
    daemon.send(signal.SIGHUP)
    time.sleep(0.5)
    exchange(pods, [(40, 4, 0)])
    s = daemon.wait_for(closed(1, destination_workload="httpbin2"), what="relabelled connection")
    old = {"reporter": "source", "destination_workload": "httpbin"}
    assert value(s, W + "received_bytes_total", **old) == 100
    assert (
        value(s, W + "received_bytes_total", reporter="source", destination_workload="httpbin2")
        == 40
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs for the access log: a real 'disk full'."""
    log_dir = tmp_path / "log"
    log_dir.mkdir(exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(log_dir))
    yield log_dir
    sh("umount", "-l", str(log_dir))


def test_full_disk_drops_records_counted_and_metrics_stay_exact(
    small_disk: Path, tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """With the access-log disk full, records are dropped and counted; metrics stay exact."""
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir)
    daemon.start()
    try:
        plan = [(50, 5, 0)] * 300
        exchange(pods, plan)
        s = daemon.wait_for(closed(300), what="300 closed")
        time.sleep(0.5)
        s = daemon.samples()
        assert value(s, W + "received_bytes_total", reporter="source") == 300 * 50
        dropped = value(s, "kmeshd_accesslog_records_dropped_total", sink="file")
        written = complete_lines(daemon.accesslog.read_text())  # a cut-off line was dropped
        assert dropped > 0 and written + dropped == 600
        assert value(s, "kmeshd_sink_up", sink="file") == 0
    finally:
        daemon.close()


def complete_lines(text: str) -> int:
    """JSON lines that are whole (the disk filled up in the middle of one)."""
    whole = 0
    for line in text.splitlines():
        try:
            json.loads(line)
            whole += 1
        except json.JSONDecodeError:
            pass
    return whole


FAILURES = "kmeshd_textfile_write_failures_total"
LAST_PUBLISH = "kmeshd_last_publish_timestamp_seconds"


def test_textfile_directory_removed_at_run_time(
    daemon: DaemonProcess, pods: dict[str, Pod]
) -> None:
    """An unwritable textfile marks its sink down; /metrics keeps working; it recovers."""
    directory = daemon.textfile.parent
    for f in directory.iterdir():
        f.unlink()
    directory.rmdir()
    exchange(pods, [(10, 1, 0)])
    s = daemon.wait_for(lambda s: value(s, "kmeshd_sink_up", sink="textfile") == 0, what="down")
    assert value(s, W + "received_bytes_total", reporter="source") == 10
    failures, published = value(s, FAILURES), value(s, LAST_PUBLISH)
    assert failures >= 1
    # Each failed publish counts once: publishes come every 200 ms, so the count grows by
    # as many as the publish timestamps say came between two scrapes.
    s = daemon.wait_for(lambda s: value(s, LAST_PUBLISH) > published + 0.5, what="publishes")
    publishes = round((value(s, LAST_PUBLISH) - published) / 0.2)
    assert value(s, FAILURES) - failures == publishes
    directory.mkdir()
    s = daemon.wait_for(lambda s: value(s, "kmeshd_sink_up", sink="textfile") == 1, what="up again")
    assert daemon.textfile.exists()
    failures, published = value(s, FAILURES), value(s, LAST_PUBLISH)
    s = daemon.wait_for(lambda s: value(s, LAST_PUBLISH) > published + 0.3, what="publishes")
    assert value(s, FAILURES) == failures  # written: none failed
    assert daemon.stderr().count("cannot write") == 1  # logged once, not every interval
    assert 'kmeshd_accesslog_records_dropped_total{sink="textfile"}' not in daemon.scrape()


def test_access_log_budget_delays_records_but_not_metrics(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """Over accesslog.max_rate, records wait in the kernel's ring; metrics are exact at once."""
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, max_rate=40)
    daemon.start()
    ready = time.monotonic()
    try:
        exchange(pods, [(20, 2, 0)] * 100)
        s = daemon.wait_for(closed(100), what="100 closed")
        assert value(s, W + "received_bytes_total", reporter="source") == 2000
        allowed = 40 + 40 * (time.monotonic() - ready) + 2  # a burst, then 40 a second
        assert len(daemon.access_log()) <= min(allowed, 199)
        records = wait_records(daemon, 200, timeout=15)
        assert sum(r["received_bytes"] for r in records) == 2 * 2000
        assert value(daemon.samples(), "kmeshd_events_lost_total") == 0
    finally:
        daemon.close()


def test_access_log_off_queues_no_records(
    tmp_path: Path, pin_dir: Path, pods: dict[str, Pod]
) -> None:
    """With no access-log sink the kernel queues no records: none lost, metrics exact."""
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, accesslog_file=False)
    daemon.start()
    try:
        exchange(pods, [(30, 3, 1)] * 50)
        s = daemon.wait_for(closed(50), what="50 closed")
        assert value(s, W + "received_bytes_total", reporter="destination") == 1500
        assert value(s, "kmeshd_events_lost_total") == 0
        assert value(s, "kmeshd_accesslog_records_total") == 0
        assert value(s, "kmeshd_events_total", kind="closed") >= 100
        assert not daemon.accesslog.exists()
    finally:
        daemon.close()
