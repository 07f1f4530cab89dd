"""Shared pieces of the end-to-end tests: the pods' inventory, traffic, waiting."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmeshd.kernel import cgroup
from kmeshd.kernel.layout import LAYOUT
from tests.daemon_proc import DaemonProcess, Samples, value
from tests.netns import Pod, sh

CLIENT = "sleep-7c8f6b9d4-x2x7q"
SERVER = "httpbin-5c5944c58c-v9mlk"
SERVICE = "httpbin.default.svc.cluster.local"
INVENTORY = """
cluster = "Kubernetes"
[[workload]]
name = "sleep-7c8f6b9d4-x2x7q"
workload = "sleep"
namespace = "default"
addresses = ["10.244.77.2", "fd00:77::2"]
service_account = "sleep"
[[workload]]
name = "httpbin-5c5944c58c-v9mlk"
workload = "httpbin"
namespace = "default"
canonical_revision = "v1"
addresses = ["10.244.77.3", "fd00:77::3"]
service_account = "httpbin"
[[service]]
name = "httpbin"
namespace = "default"
ports = [{ port = 8000, target_port = 80 }]
workloads = ["httpbin"]
"""

W = "kmesh_tcp_workload_"
REPORTERS = ("source", "destination")


def both(s: Samples, name: str, **labels: str) -> list[float]:
    """A workload family's value for the source and the destination reporter."""
    return [value(s, W + name, reporter=r, **labels) for r in REPORTERS]


def serve(server: Pod, count: int, bind: str = "0.0.0.0", port: int = 80) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        server.traffic("serve", "--bind", bind, "--port", str(port), "--count", str(count)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    return proc


def run_plan(client: Pod, host: str, plan: list[tuple[int, int, int]], port: int = 80) -> None:
    spec = ",".join(f"{a}:{b}:{c}" for a, b, c in plan)
    out = client.run(
        *client.traffic("connect", "--host", host, "--port", str(port), "--plan", spec)
    )
    assert json.loads(out.stdout) == {"connections": len(plan)}


def exchange(pods: dict[str, Pod], plan: list[tuple[int, int, int]], ipv6: bool = False) -> None:
    server = pods["server"]
    proc = serve(server, len(plan), bind="::" if ipv6 else "0.0.0.0")
    run_plan(pods["client"], server.ip6 if ipv6 else server.ip4, plan)
    assert proc.wait(timeout=30) == 0


def closed(n: int, **labels: str) -> Callable[[Samples], bool]:
    def check(s: Samples) -> bool:
        return (
            value(s, W + "connections_closed_total", reporter="source", **labels) >= n
            and value(s, W + "connections_closed_total", reporter="destination", **labels) >= n
        )

    return check


def wait_records(daemon: DaemonProcess, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(records := daemon.access_log()) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(records) == n, records
    return records


def attached_probes() -> int:
    """How many kmeshd sock_ops programs are attached to the cgroup v2 root."""
    root = cgroup.directory("auto", "test")
    out = sh("bpftool", "-j", "cgroup", "show", str(root)).stdout
    return sum(1 for p in json.loads(out.strip() or "[]") if p.get("name") == "kmeshd_sockops")


def hold(client: Pod, host: str, request: int, reply: int, port: int) -> subprocess.Popen[str]:
    """One exchange on a connection that stays open until `release`."""
    proc = subprocess.Popen(
        client.traffic(
            "hold", "--host", host, "--port", str(port),
            "--request", str(request), "--reply", str(reply),
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "open"
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    """Close a held connection (the client closes first) and wait for it."""
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def socket_states(pin_dir: Path) -> int:
    """Entries in the probe's per-socket state map."""
    out = sh("bpftool", "-j", "map", "dump", "pinned", str(pin_dir / f"v{LAYOUT}" / "socks"))
    return len(json.loads(out.stdout))
