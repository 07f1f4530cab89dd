"""Part five of `make bench`: what publishing and scraping cost at a real node's size.

    .venv/bin/python -m tests.bench.scale [--label-sets N ...] [--out FILE]   # 1000 10000

For each size, the inventory names N/2 client workloads on loopback addresses (127.1.x.y)
and one server workload (127.0.0.2); each client makes one connection to the server (10
bytes up, 5 down). Each connection has two reporters, so the workload level (and the
service level) holds N label sets. Then, from a publish that saw every connection:

- publish: kmeshd_publish_duration_seconds (the textfile's write included), and the
  textfile's own write time where the daemon exports it;
- scrape: wall time of GET /metrics, plain and with Accept-Encoding: gzip, the median of 5,
  and the body's bytes and lines, per label set;
- the daemon's peak RSS (VmHWM).

A size whose publish or scrape does not finish within --timeout seconds is reported as
such (the daemon of an older version can take minutes and gigabytes at 10,000 label sets).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from kmeshd.kernel.pins import remove_pins
from tests.bench.probes import peak_rss_bytes, stop_daemon
from tests.daemon_proc import DaemonProcess, value
from tests.loopback import address, connect_all, inventory, server

SERVER = "127.0.0.2"
PORT = 18080
BPFFS = Path("/sys/fs/bpf")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.scale", description=__doc__)
    p.add_argument("--label-sets", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--interval", default="2s", help="metrics.interval of the daemon")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "scale.json")
    return p.parse_args()


def client_address(i: int) -> str:
    return address(1, i)


def clients_inventory(clients: int) -> str:
    named = ((f"client-{i}", client_address(i)) for i in range(clients))
    return inventory(SERVER, named, "bench")


def timed_get(url: str, gzipped: bool) -> tuple[float, bytes]:
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    started = time.monotonic()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=600) as r:
        body = r.read()
        encoding = r.headers.get("Content-Encoding", "")
    took = time.monotonic() - started
    if gzipped and encoding != "gzip":
        raise RuntimeError("asked for gzip, got an uncompressed body")
    return took, body


def measure(label_sets: int, interval: str, timeout: float) -> dict[str, Any]:
    clients = label_sets // 2
    workdir = Path(tempfile.mkdtemp(prefix=f"kmeshd-scale-{label_sets}-"))
    pin_dir = BPFFS / f"kmeshd-bench-scale-{uuid.uuid4().hex[:8]}"
    daemon = DaemonProcess(
        workdir,
        clients_inventory(clients),
        pin_dir,
        accesslog_file=False,
        interval=interval,
        metrics="",
    )
    result: dict[str, Any] = {"label_sets": label_sets, "clients": clients}
    try:
        daemon.start(timeout=300)
        assert daemon.proc is not None
        started = time.monotonic()
        with server(SERVER, PORT):
            connect_all([client_address(i) for i in range(clients)], SERVER, PORT)
        result["connect_seconds"] = round(time.monotonic() - started, 2)
        url = f"http://127.0.0.1:{daemon.port}/metrics"
        deadline = time.monotonic() + timeout
        while True:  # a publish that saw every connection closed, on both ends
            took, body = timed_get(url, gzipped=False)
            text = body.decode()
            closed = value_of(text, "kmesh_tcp_workload_connections_closed_total")
            if closed >= 2 * clients:
                break
            if time.monotonic() > deadline:
                result["timed_out"] = f"{closed} of {2 * clients} closes published"
                return result
            time.sleep(0.5)
        # The health a publish carries times the publish before it: two more publishes,
        # and the figures are those of a publish that had every label set.
        for _ in range(2):
            last = value_of(text, "kmeshd_last_publish_timestamp_seconds")
            while value_of(text, "kmeshd_last_publish_timestamp_seconds") == last:
                time.sleep(0.2)
                text = timed_get(url, gzipped=False)[1].decode()
        plain = [timed_get(url, gzipped=False) for _ in range(5)]
        zipped = [timed_get(url, gzipped=True) for _ in range(5)]
        text = plain[-1][1].decode()
        result |= {
            "publish_seconds": value_of(text, "kmeshd_publish_duration_seconds"),
            "textfile_write_seconds": value_of(text, "kmeshd_textfile_write_duration_seconds"),
            "scrape_seconds": round(statistics.median(t for t, _ in plain), 4),
            "scrape_gzip_seconds": round(statistics.median(t for t, _ in zipped), 4),
            "body_bytes": len(plain[-1][1]),
            "body_gzip_bytes": len(zipped[-1][1]),
            "lines": text.count("\n"),
            "bytes_per_label_set": round(len(plain[-1][1]) / (2 * label_sets)),
            "lines_per_label_set": round(kmesh_lines(text) / (2 * label_sets), 1),
            "textfile_bytes": daemon.textfile.stat().st_size,
            "peak_rss_mib": round(peak_rss_bytes(daemon.proc.pid) / 2**20, 1),
            "closed": value_of(text, "kmesh_tcp_workload_connections_closed_total"),
        }
        result["gzip_matches"] = len(gzip.decompress(zipped[-1][1])) > 0
        return result
    finally:
        stop_daemon(daemon)
        remove_pins(pin_dir)


def kmesh_lines(text: str) -> int:
    """Sample lines of the kmesh_* families: what a label set costs, both levels."""
    return sum(1 for line in text.splitlines() if line.startswith("kmesh_"))


def value_of(text: str, name: str) -> float:
    from tests.daemon_proc import parse_metrics

    return value(parse_metrics(text), name)


def main() -> None:
    args = parse_args()
    results = []
    for n in args.label_sets:
        print(f"scale: {n} label sets per level", flush=True)
        r = measure(n, args.interval, args.timeout)
        print(json.dumps(r), flush=True)
        results.append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
