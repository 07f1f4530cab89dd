"""Part seven of `make bench`: a month of a node's churn in minutes, against the real
daemon and probe.

    .venv/bin/python -m tests.bench.soak [--waves N] [--connections N] [--peers N]
                                         [--identities N] [--out FILE]

Each wave makes `connections` connections to one server workload from `peers` source
addresses never seen before (loopback, 127.x.y.z), two each: all but `identities` of them
are unknown peers (counted under "-"), the rest are client workloads new to the inventory,
which is rewritten with them and reloaded (SIGHUP) before the wave, the previous wave's
clients dropped. So over the default 20 waves: 1,000,000 connections from 500,000
distinct peers, 10,000 identities come and gone. Time is compressed: flow_expiry 2 s,
series_ttl 5 s, a publish a second, and the waves follow each other as fast as they go.

After each wave, once its connections are all published (and checked exact: the unknown
peers' label set holds all of theirs since the start, the wave's clients' label sets
theirs; earlier clients' label sets have left): the daemon's RSS, the flows map's entries,
the label sets per level, /metrics bytes and the time of a plain scrape, the last
publish's time; and the most entries the flows map held at a publish during the wave.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import re
import signal
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from kmeshd.kernel.pins import remove_pins
from tests.bench.probes import peak_rss_bytes, stop_daemon
from tests.daemon_proc import DaemonProcess, Samples, free_port, parse_metrics, value
from tests.loopback import REPLY, REQUEST, address, connect_all, inventory, server

SERVER = "127.0.0.5"
BPFFS = Path("/sys/fs/bpf")
W = "kmesh_tcp_workload_"


def wave_inventory(wave: int, identities: int) -> str:
    """The server, and the wave's client workloads (its first `identities` peers)."""
    clients = ((f"c{wave}-{i}", address(10 + wave, i)) for i in range(identities))
    return inventory(SERVER, clients, "soak")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape(port: int) -> tuple[float, str]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        body = r.read()
    return time.monotonic() - started, body.decode()


class Occupancy:
    """The most entries the flows map held at a publish while a wave ran: the gauge,
    read from a gzip scrape twice a second (it changes once a publish)."""

    ENTRIES = re.compile(rb'^kmeshd_bpf_map_entries\{map="flows"\} (\S+)$', re.M)

    def __init__(self, port: int) -> None:
        self.port = port
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Occupancy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        url = f"http://127.0.0.1:{self.port}/metrics"
        while not self._stop.wait(0.5):
            request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
            with urllib.request.urlopen(request, timeout=60) as r:
                found = self.ENTRIES.search(gzip.decompress(r.read()))
            if found:
                self.peak = max(self.peak, float(found.group(1)))


def counts(s: Samples, reporter: str, **labels: str) -> tuple[float, float, float, float]:
    return tuple(  # type: ignore[return-value]
        value(s, W + name, reporter=reporter, **labels)
        for name in (
            "connections_opened_total",
            "connections_closed_total",
            "received_bytes_total",
            "sent_bytes_total",
        )
    )


def exact(n: int) -> tuple[float, float, float, float]:
    return (n, n, n * len(REQUEST), n * len(REPLY))


def wave_done(s: Samples, unknown: int, clients: dict[str, str], each: int) -> bool:
    """The unknown peers' label set holds every connection of theirs so far, and the
    wave's client label sets (not expired yet) theirs: both reporters, exactly."""
    return all(
        counts(s, r, source_workload="-") == exact(unknown)
        and counts(s, r, source_workload_namespace="soak") == exact(each * len(clients))
        for r in ("source", "destination")
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="kmeshd-soak-"))
    pin_dir = BPFFS / f"kmeshd-bench-soak-{uuid.uuid4().hex[:8]}"
    port = free_port()
    daemon = DaemonProcess(
        workdir,
        wave_inventory(0, args.identities),
        pin_dir,
        accesslog_file=False,
        interval="1s",
        bpf='flow_expiry = "2s"\nmax_flows = 131072',
        metrics='series_ttl = "5s"',
    )
    waves = []
    try:
        daemon.start(timeout=120)
        assert daemon.proc is not None
        pid = daemon.proc.pid
        start = {"rss_mib": round(rss_mib(pid), 1)}
        with server(SERVER, port, threads=8):
            for wave in range(args.waves):
                if wave:
                    (workdir / "inventory.toml").write_text(wave_inventory(wave, args.identities))
                    daemon.send(signal.SIGHUP)
                    time.sleep(0.5)
                per_peer = args.connections // args.peers
                sources = [address(10 + wave, i) for i in range(args.peers)] * per_peer
                unknown = (args.peers - args.identities) * per_peer * (wave + 1)
                clients = {f"c{wave}-{i}": address(10 + wave, i) for i in range(args.identities)}
                check = functools.partial(
                    wave_done, unknown=unknown, clients=clients, each=per_peer
                )
                started = time.monotonic()
                with Occupancy(daemon.port) as occupancy:
                    connect_all(sources, SERVER, port, threads=8)
                    took = time.monotonic() - started
                    daemon.wait_for(check, timeout=60, what=f"wave {wave}")
                scrape_s, text = scrape(daemon.port)
                s = parse_metrics(text)
                entries = value(s, "kmeshd_bpf_map_entries", map="flows")
                waves.append(
                    {
                        "wave": wave,
                        "connections_per_s": round(args.connections / took),
                        "rss_mib": round(rss_mib(pid), 1),
                        "flow_entries": entries,
                        "flow_entries_peak": occupancy.peak,
                        "label_sets": value(s, "kmeshd_series", level="workload"),
                        "metrics_bytes": len(text),
                        "scrape_s": round(scrape_s, 4),
                        "publish_s": value(s, "kmeshd_publish_duration_seconds"),
                        "map_full": value(s, "kmeshd_bpf_map_full_total"),
                        "generations": value(s, "kmeshd_bpf_flow_generations_total"),
                        "series_expired": value(s, "kmeshd_series_expired_total"),
                    }
                )
                print(json.dumps(waves[-1]), flush=True)
        s = daemon.wait_for(
            lambda s: value(s, "kmeshd_bpf_map_entries", map="flows") == 0, timeout=30
        )
        return {
            "connections": args.connections * args.waves,
            "distinct_peers": args.peers * args.waves,
            "identities": args.identities * args.waves,
            "exact": True,  # every wave's counts were checked exact above
            "start": start,
            "waves": waves,
            "end": {
                "rss_mib": round(rss_mib(pid), 1),
                "peak_rss_mib": round(peak_rss_bytes(pid) / 2**20, 1),
                "flow_entries": value(s, "kmeshd_bpf_map_entries", map="flows"),
                "label_sets": value(s, "kmeshd_series", level="workload"),
            },
        }
    finally:
        stop_daemon(daemon)
        remove_pins(pin_dir)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__)
    p.add_argument("--waves", type=int, default=20)
    p.add_argument("--connections", type=int, default=50_000)
    p.add_argument("--peers", type=int, default=25_000)
    p.add_argument("--identities", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "soak.json")
    args = p.parse_args()
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "waves"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
