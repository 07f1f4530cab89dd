"""`sudo make bench-identity`: kmeshd's Kubernetes identity source at cluster scale.

A test apiserver (tests/k8s_server.py: real list/watch over HTTPS) holds a synthetic cluster
(default 150,000 pods, 20,000 services with one EndpointSlice each, 5,000 nodes); a test
kubelet serves this node's share. The real `kmeshd run` syncs from them, and the benchmark
reports:

- sync: from the daemon's start to the end of its last initial list (the request log's
  first watch of each resource), and to READY=1 (which also waits for the BPF compile);
- memory: the daemon's RSS and peak RSS once synced; and, in this process, what the
  identity cache itself takes (RSS growth from parsing and holding the same lists);
- lookup: microseconds per event to resolve both ends and the service of a flow
  (`labels.ends_of`) against the full cache, hits and misses mixed;
- requests: every request the daemon made, by kind, during the sync and during a steady
  window with pod churn (watch events only), and the requests per hour that follow from
  the watch lengths it asked for;
- CPU: the daemon's in windows with pod churn and in as many as long without, taken in
  turn: what the events cost is the difference.

    .venv/bin/python -m tests.bench.identity [--pods N] [--services N] [--nodes N]
                                             [--window SECONDS] [--churn EVENTS_PER_S]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kmeshd.identity import apiserver
from kmeshd.identity.cache import IdentityCache
from kmeshd.identity.client import Client
from kmeshd.identity.credentials import Credentials, TokenSource
from kmeshd.identity.objects import Naming
from kmeshd.identity.updates import Update, apply
from kmeshd.kernel.memory import release_freed_memory
from kmeshd.kernel.pins import remove_pins
from kmeshd.labels import ends_of
from tests.bench.probes import cpu_seconds
from tests.daemon_proc import DaemonProcess
from tests.k8s_server import (
    ApiServer,
    Cluster,
    FakeKubelet,
    synthetic_pod_ip,
    synthetic_service_ip,
    write_kubeconfig,
)
from tests.tls import make_tls

NODE = "node-0"
PAIRS = 3  # quiet and churn windows, alternating
PATHS = {r.path: r.name for r in apiserver.RESOURCES}
MiB = 1024 * 1024


def status_kib(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class RequestClock:
    """Samples the server's request log, noting when each resource's first watch came."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server
        self.first_watch: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for r in self.server.log:
                name = PATHS.get(r.path)
                if name and r.query.get("watch") and name not in self.first_watch:
                    self.first_watch[name] = time.monotonic()
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def count_requests(server: ApiServer, kubelet: FakeKubelet) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in server.log:
        kind = "watch" if r.query.get("watch") else "list page"
        key = f"{PATHS.get(r.path, r.path)} {kind}"
        counts[key] = counts.get(key, 0) + 1
    counts["kubelet /pods"] = len(kubelet.log)
    return counts


def churn(args: argparse.Namespace, cluster: Cluster, stop: threading.Event) -> None:
    """Pods relabelled at `args.churn` a second: MODIFIED events the daemon must follow."""
    rng = random.Random(7)
    while not stop.wait(1.0 / args.churn):
        i = rng.randrange(args.pods)
        s = i % args.services
        obj = cluster.get("pods", f"ns-{s % 50}", f"svc-{s}-{i}")
        if obj is not None:
            obj["metadata"].setdefault("labels", {})["version"] = f"v{rng.randrange(100)}"
            cluster.put("pods", obj)


def daemon_run(args: argparse.Namespace, cluster: Cluster, tls: Any, work: Path) -> dict[str, Any]:
    api = ApiServer(cluster, tls, max_watch_seconds=3600)
    kubelet = FakeKubelet(NODE, cluster, tls=tls)
    api.start()
    kubelet.start()
    work.mkdir(parents=True, exist_ok=True)
    kubeconfig = write_kubeconfig(work / "kubeconfig", api.url, tls)
    pin_dir = Path(f"/sys/fs/bpf/kmeshd-bench-identity-{uuid.uuid4().hex[:6]}")
    table = f'kubeconfig = "{kubeconfig}"\nnode_name = "{NODE}"\nkubelet_url = "{kubelet.url}"\n'
    daemon = DaemonProcess(
        work, "", pin_dir, kubernetes=table, accesslog_file=False, textfile=False, metrics=""
    )
    clock = RequestClock(api)
    try:
        started = time.monotonic()
        daemon.start(timeout=300)
        ready = time.monotonic() - started
        clock.stop()
        synced = max(clock.first_watch.values()) - started
        assert daemon.proc is not None
        pid = daemon.proc.pid
        time.sleep(2)
        after_sync = {
            "rss_mib": status_kib(pid, "VmRSS") / 1024,
            "peak_rss_mib": status_kib(pid, "VmHWM") / 1024,
            "rss_anon_mib": status_kib(pid, "RssAnon") / 1024,
        }
        sync_requests = count_requests(api, kubelet)
        lengths = [int(r.query["timeoutSeconds"]) for r in api.log if r.query.get("watch")]
        api.clear_log()
        kubelet.clear_log()
        progress(
            f"synced in {synced:.1f} s (READY after {ready:.1f} s); quiet and churn windows..."
        )
        # Alternating quiet and churn windows, so that the host's drift falls on both.
        quiet_cpu = window_cpu = 0.0
        part = args.window / PAIRS
        for _ in range(PAIRS):
            cpu0 = cpu_seconds(pid)
            time.sleep(part)
            quiet_cpu += cpu_seconds(pid) - cpu0
            cpu0 = cpu_seconds(pid)
            stop = threading.Event()
            churner = threading.Thread(target=churn, args=(args, cluster, stop))
            churner.start()
            time.sleep(part)
            stop.set()
            churner.join()
            window_cpu += cpu_seconds(pid) - cpu0
        steady = count_requests(api, kubelet)
        lengths += [int(r.query["timeoutSeconds"]) for r in api.log if r.query.get("watch")]
        return {
            "sync_s": synced,
            "ready_s": ready,
            **after_sync,
            "rss_end_mib": status_kib(pid, "VmRSS") / 1024,
            "peak_rss_end_mib": status_kib(pid, "VmHWM") / 1024,
            "sync_requests": sync_requests,
            "steady_window_s": args.window,
            "steady_requests": steady,
            "steady_cpu_s": window_cpu,
            "quiet_cpu_s": quiet_cpu,
            "churn_events_per_s": args.churn,
            "watch_lengths_s": lengths,
        }
    finally:
        daemon.close()
        remove_pins(pin_dir)
        api.stop()
        kubelet.stop()


def cache_cost(args: argparse.Namespace, cluster: Cluster, tls: Any) -> dict[str, Any]:
    """The same lists parsed into a cache in this process: its memory and lookup cost."""
    with ApiServer(cluster, tls, max_watch_seconds=3600) as api:
        creds = Credentials(server=api.url, ca_file=tls.ca_cert, token=TokenSource("test-token"))
        client = Client(creds)
        gc.collect()
        release_freed_memory()
        before = status_kib("self", "VmRSS")
        cache = IdentityCache(NODE)
        out: Any = _ListSink()
        for resource in apiserver.RESOURCES:
            apiserver.Watcher(client, resource, Naming(), out, threading.Event()).list_all()
            for update in out.items:
                apply(cache, update, time.monotonic())
            out.items.clear()
        gc.collect()
        release_freed_memory()
        held = (status_kib("self", "VmRSS") - before) / 1024
    return {"cache_mib": held, "lookup_us": lookup_us(cache, args), "counts": cache.counts()}


class _ListSink:
    """Stands in for the queue: keeps what a watcher puts."""

    def __init__(self) -> None:
        self.items: list[Update] = []

    def put(self, item: Update) -> None:
        self.items.append(item)


def lookup_us(cache: IdentityCache, args: argparse.Namespace) -> dict[str, float]:
    """Microseconds per `ends_of` (both ends and the service) over flows that mix pod IPs,
    service VIPs and unknown addresses, by how many distinct flows are looked up: the
    cost is memory latency, so a node's few hundred active flows cost less than lookups
    spread over the whole cluster."""
    rng = random.Random(3)

    def pod_ip() -> Any:
        return ipaddress.ip_address(synthetic_pod_ip(rng.randrange(args.pods)))

    flows = []
    for n in range(100_000):
        client = pod_ip() if n % 4 else ipaddress.ip_address(f"192.0.2.{n % 250}")
        if n % 3 == 0:
            vip = synthetic_service_ip(rng.randrange(args.services))
            server, port = ipaddress.ip_address(vip), 80
        else:
            server, port = pod_ip(), 8080
        flows.append((client, server, port))
    result = {}
    for distinct in (100, 1_000, 100_000):
        batch = flows[:distinct] * (100_000 // distinct)
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for client, server, port in batch:
                ends_of(cache, client, server, port)
            runs.append((time.perf_counter() - started) / len(batch) * 1e6)
        result[f"{distinct} flows"] = statistics.median(runs)
    return result


def per_hour(result: dict[str, Any], kubelet_interval: float = 10.0) -> dict[str, float]:
    lengths = result["watch_lengths_s"]
    mean = statistics.mean(lengths) if lengths else 450.0
    return {
        "apiserver watches": len(apiserver.RESOURCES) * 3600 / mean,
        "apiserver lists": 0.0,
        "kubelet polls": 3600 / kubelet_interval,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.identity", description=__doc__)
    p.add_argument("--pods", type=int, default=150_000)
    p.add_argument("--services", type=int, default=20_000)
    p.add_argument("--nodes", type=int, default=5_000)
    p.add_argument("--window", type=float, default=60.0)
    p.add_argument("--churn", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "identity.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kmeshd-bench-identity-") as tmp:
        work = Path(tmp)
        tls = make_tls(work / "tls")
        cluster = Cluster()
        started = time.monotonic()
        cluster.load_synthetic(args.pods, args.services, args.nodes)
        progress(f"test cluster loaded in {time.monotonic() - started:.1f} s")
        daemon = daemon_run(args, cluster, tls, work / "daemon")
        cache = cache_cost(args, cluster, tls)
    result = {"cluster": vars(args) | {"out": str(args.out)}, "daemon": daemon, "cache": cache}
    result["requests_per_hour"] = per_hour(daemon)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0


def render(r: dict[str, Any]) -> str:
    d, c, c_args = r["daemon"], r["cache"], r["cluster"]
    steady = ", ".join(f"{k} {v}" for k, v in sorted(d["steady_requests"].items()) if v)
    sync = ", ".join(f"{k} {v}" for k, v in sorted(d["sync_requests"].items()))
    hourly = ", ".join(f"{k} {v:.0f}" for k, v in r["requests_per_hour"].items())
    return "\n".join(
        [
            f"cluster: {c_args['pods']:,} pods, {c_args['services']:,} services "
            f"(+ as many EndpointSlices), {c_args['nodes']:,} nodes",
            f"sync: {d['sync_s']:.1f} s to the last initial list;"
            f" READY=1 after {d['ready_s']:.1f} s",
            f"daemon memory once synced: RSS {d['rss_mib']:.0f} MiB (anon {d['rss_anon_mib']:.0f}),"
            f" peak {d['peak_rss_mib']:.0f} MiB; after the steady window: RSS"
            f" {d['rss_end_mib']:.0f} MiB, peak {d['peak_rss_end_mib']:.0f} MiB",
            f"identity cache alone: {c['cache_mib']:.0f} MiB for {c['counts']}",
            "lookup per event (ends_of: both ends + service), median µs by distinct flows: "
            + ", ".join(f"{k} {v:.2f}" for k, v in c["lookup_us"].items()),
            f"requests during sync: {sync}",
            f"steady window {d['steady_window_s']:.0f} s with {d['churn_events_per_s']:.0f} pod"
            f" events/s: {steady or 'none'}; daemon CPU {d['steady_cpu_s']:.2f} s, against"
            f" {d['quiet_cpu_s']:.2f} s in as long without events: the events cost"
            f" {(d['steady_cpu_s'] - d['quiet_cpu_s']) * 60 / d['steady_window_s']:.2f} s a"
            " minute",
            f"watch lengths asked for: {d['watch_lengths_s']} s -> per hour: {hourly}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
