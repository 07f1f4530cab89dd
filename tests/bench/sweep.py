"""`make bench`, part three: what the socket sweep behind live bytes (bpf.live_updates) costs
each publish, by how many connections are open. A benchmark, not a test: it prints a table,
writes JSON, and fails only if it cannot run.

    .venv/bin/python -m tests.bench.sweep [--open N,...] [--publishes P] [--out FILE]

For each number of open connections (default 0 and 5,000: 10,000 sockets with both ends
tracked) and each of kmeshd-core (live updates off) and kmeshd (on, the default), in the
loopback scenario's namespace: start kmeshd (metrics.interval 1 s), open the connections
(idle: no bytes move), let two publishes pass; then, over P intervals in which nothing
scrapes /metrics and with kernel.bpf_stats_enabled=1, take the daemon's CPU time and the
iterator program's runs and run time as the kernel times them, per publish; then read the
daemon's own kmeshd_publish_duration_seconds over P more publishes (the sweep runs first
in each publish). The sweep walks every open file on the host, whatever its network
namespace (entering none); the host's namespaces are counted beside the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from kmeshd.kernel import sockdiag
from tests.bench.probes import DaemonSettings, bpf_stats, cpu_seconds, kmeshd, prog_stats
from tests.bench.scenarios import LOOPBACK_ADDRESS, PORT, loopback, loopback_namespace
from tests.bench.scenarios import inventory as inventory_of
from tests.daemon_proc import DaemonProcess, Samples, value

BPFFS = Path("/sys/fs/bpf")
ITERATOR = ("task_file", "tracing")  # how bpftool lists the iterator program: name, type
CONFIGS = ("kmeshd-core", "kmeshd")
LAST_PUBLISH = "kmeshd_last_publish_timestamp_seconds"
INTERVAL_S = 1


@contextmanager
def open_connections(netns: str, count: int) -> Iterator[None]:
    """`count` established loopback connections inside `netns`, idle, until the block ends.
    A thread enters the namespace, so this process's other threads stay where they are."""
    socks: list[socket.socket] = []
    failure: list[BaseException] = []

    def connect_all() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            if ctypes.CDLL(None, use_errno=True).setns(fd, sockdiag.CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {netns}")
            os.close(fd)
            server = socket.create_server((LOOPBACK_ADDRESS, PORT + 1), backlog=128)
            socks.append(server)
            for _ in range(count):
                socks.append(socket.create_connection((LOOPBACK_ADDRESS, PORT + 1)))
                socks.append(server.accept()[0])
        except BaseException as exc:  # reported in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=connect_all)
    worker.start()
    worker.join()
    try:
        if failure:
            raise failure[0]
        yield
    finally:
        for s in socks:
            s.close()


def next_publish(daemon: DaemonProcess, after: float) -> Samples:
    return daemon.wait_for(lambda s: value(s, LAST_PUBLISH) > after, timeout=10, what="publish")


def measure(
    config: str, connections: int, publishes: int, netns: str, inv: str, tmp: Path
) -> dict[str, Any]:
    pins = BPFFS / f"kmeshd-sweep-{uuid.uuid4().hex[:8]}"
    workdir = tmp / f"{config}-{connections}"
    live = config == "kmeshd"
    settings = DaemonSettings(interval=f"{INTERVAL_S}s")
    with kmeshd(workdir, inv, pins, accesslog=False, settings=settings, live_updates=live) as w:
        assert w.pid is not None and w.daemon is not None
        daemon = w.daemon
        with open_connections(netns, connections):
            s = daemon.samples()
            for _ in range(2):
                s = next_publish(daemon, value(s, LAST_PUBLISH))
            active = value(s, "kmesh_tcp_workload_connections_active", reporter="destination")
            with bpf_stats():
                # A quiet window: nothing scrapes /metrics, so the daemon's CPU is its publishes'.
                first = value(s, LAST_PUBLISH)
                runs_before, cpu_before = prog_stats(*ITERATOR), cpu_seconds(w.pid)
                time.sleep(publishes * INTERVAL_S)
                runs_after, cpu_after = prog_stats(*ITERATOR), cpu_seconds(w.pid)
                s = daemon.samples()
                done = round((value(s, LAST_PUBLISH) - first) / INTERVAL_S)
            durations = []
            for _ in range(publishes):
                s = next_publish(daemon, value(s, LAST_PUBLISH))
                durations.append(value(s, "kmeshd_publish_duration_seconds"))
    return {
        "config": config,
        "connections": connections,
        "active_seen": active,
        "namespaces": len(sockdiag.namespace_paths().paths),
        "publish_ms_median": statistics.median(durations) * 1e3,
        "publish_ms_max": max(durations) * 1e3,
        "publishes_timed": done,
        "daemon_cpu_ms_per_publish": (cpu_after - cpu_before) * 1e3 / done,
        "iterator_runs_per_publish": (runs_after.runs - runs_before.runs) / done,
        "iterator_ms_per_publish": (runs_after.run_time_ns - runs_before.run_time_ns) / 1e6 / done,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nsocket sweep: each publish, idle connections open (loopback namespace)")
    print(f"{'config':<12} {'conns':>6} {'active':>6} {'netns':>5} {'publish ms':>11} "
          f"{'max':>6} {'CPU ms':>7} {'iter runs':>9} {'iter ms':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['config']:<12} {r['connections']:>6} {r['active_seen']:>6.0f} "
            f"{r['namespaces']:>5} {r['publish_ms_median']:>11.2f} {r['publish_ms_max']:>6.2f} "
            f"{r['daemon_cpu_ms_per_publish']:>7.2f} {r['iterator_runs_per_publish']:>9.0f} "
            f"{r['iterator_ms_per_publish']:>8.3f}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--open", default="0,5000", help="connection counts, comma-separated")
    p.add_argument("--publishes", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("tests/bench/out/sweep.json"))
    args = p.parse_args()
    counts = [int(n) for n in args.open.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(counts) + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    rows = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kmeshd-sweep-")))
        netns = stack.enter_context(loopback_namespace())
        inv = inventory_of([loopback(netns)])
        for connections in counts:
            for config in CONFIGS:
                row = measure(config, connections, args.publishes, netns, inv, tmp)
                rows.append(row)
                print(
                    f"{config} {connections}: publish {row['publish_ms_median']:.2f} ms",
                    flush=True,
                )
                time.sleep(1)  # TIME_WAIT of the last run's connections is not ours to time
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
