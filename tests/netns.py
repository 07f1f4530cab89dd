"""Network namespaces as pods: a bridge, one veth per pod, IPv4 and IPv6 addresses.

Every address is private and lives only inside the namespaces and on the bridge the
test creates; everything is removed on exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TRAFFIC = Path(__file__).with_name("traffic.py")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Pod:
    name: str
    netns: str
    ip4: str
    ip6: str

    def exec(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*self.exec(*args), check=check)

    def traffic(self, *args: str) -> list[str]:
        """Command line running tests/traffic.py inside this pod."""
        return self.exec(sys.executable, str(TRAFFIC), *args)


@contextmanager
def pod_network(names: list[str], subnet: int = 77) -> Iterator[dict[str, Pod]]:
    """Pods named `names` on 10.244.<subnet>.0/24 and fd00:<subnet>::/64."""
    tag = uuid.uuid4().hex[:6]
    bridge = f"kmbr{tag}"
    pods: dict[str, Pod] = {}
    sh("ip", "link", "add", bridge, "type", "bridge")
    try:
        sh("ip", "link", "set", bridge, "up")
        for i, name in enumerate(names, start=2):
            pods[name] = _add_pod(bridge, tag, i, name, subnet)
        yield pods
    finally:
        for pod in pods.values():
            sh("ip", "netns", "del", pod.netns, check=False)
        sh("ip", "link", "del", bridge, check=False)


def _add_pod(bridge: str, tag: str, i: int, name: str, subnet: int) -> Pod:
    pod = Pod(name, f"km{tag}{i}", f"10.244.{subnet}.{i}", f"fd00:{subnet}::{i}")
    host_end, pod_end = f"kmh{tag}{i}", f"kmp{tag}{i}"
    sh("ip", "netns", "add", pod.netns)
    sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", pod_end)
    sh("ip", "link", "set", pod_end, "netns", pod.netns)
    sh("ip", "link", "set", host_end, "master", bridge, "up")
    pod.run("ip", "link", "set", "lo", "up")
    pod.run("ip", "link", "set", pod_end, "name", "eth0")
    pod.run("ip", "addr", "add", f"{pod.ip4}/24", "dev", "eth0")
    pod.run("ip", "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
    pod.run("ip", "link", "set", "eth0", "up")
    return pod


def is_root() -> bool:
    return os.geteuid() == 0
