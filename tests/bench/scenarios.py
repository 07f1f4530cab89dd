"""The two places the churn runs: loopback inside one namespace, and between two pods.

Loopback uses 127.0.0.91, the only address on `lo` of the benchmark's own namespace (its
127.0.0.1 is removed), so the client's source address is 127.0.0.91 too. The inventory
names 127.0.0.91 rather than 127.0.0.1 because the daemon cannot tell namespaces apart:
127.0.0.1 would also match the benchmark's own /metrics scrapes and any other loopback
traffic on the host, and the counters could not be checked exactly.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from tests.bench.loadgen import Target, in_netns
from tests.netns import pod_network, sh

SUBNET = 91  # 10.244.91.0/24: not used by the tests
LOOPBACK_ADDRESS = "127.0.0.91"
PORT = 9191
SCENARIOS = ("loopback", "netns")


@dataclass(frozen=True)
class Scenario:
    name: str
    target: Target
    source_workload: str  # inventory names of the two ends: the label values to read back
    destination_workload: str
    workloads: tuple[tuple[str, str], ...]  # (name, address) inventory entries it needs


def set_sysctls(netns: str) -> None:
    sh(*in_netns(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"))


@contextmanager
def loopback_namespace() -> Iterator[str]:
    netns = f"kmbench{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", netns)
    try:
        sh(*in_netns(netns, "ip", "link", "set", "lo", "up"))
        sh(*in_netns(netns, "ip", "addr", "del", "127.0.0.1/8", "dev", "lo"))
        sh(*in_netns(netns, "ip", "addr", "add", f"{LOOPBACK_ADDRESS}/8", "dev", "lo"))
        set_sysctls(netns)
        yield netns
    finally:
        sh("ip", "netns", "del", netns, check=False)


def loopback(netns: str) -> Scenario:
    return Scenario(
        name="loopback",
        target=Target(netns, netns, LOOPBACK_ADDRESS, PORT),
        source_workload="bench-loopback",
        destination_workload="bench-loopback",
        workloads=(("bench-loopback", LOOPBACK_ADDRESS),),
    )


@contextmanager
def all_scenarios() -> Iterator[list[Scenario]]:
    """Both scenarios, with their namespaces and bridge; all removed when the block ends."""
    with ExitStack() as stack:
        netns = stack.enter_context(loopback_namespace())
        pods = stack.enter_context(pod_network(["client", "server"], subnet=SUBNET))
        client, server = pods["client"], pods["server"]
        for pod in (client, server):
            set_sysctls(pod.netns)
        between = Scenario(
            name="netns",
            target=Target(client.netns, server.netns, server.ip4, PORT),
            source_workload="bench-client",
            destination_workload="bench-server",
            workloads=(("bench-client", client.ip4), ("bench-server", server.ip4)),
        )
        yield [loopback(netns), between]


def inventory(scenarios: list[Scenario]) -> str:
    """An inventory TOML in which every benchmark address is a known workload."""
    entries = [
        f'[[workload]]\nname = "{name}"\nnamespace = "bench"\naddresses = ["{address}"]\n'
        for scenario in scenarios
        for name, address in scenario.workloads
    ]
    return "\n".join(entries)
