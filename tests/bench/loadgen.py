"""The C load generator (loadgen.c): build it, serve with it, churn connections with it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("loadgen.c")


@dataclass(frozen=True)
class Load:
    """The shape of the churn: threads on each side, bytes each way per connection."""

    client_threads: int
    server_threads: int
    request: int
    reply: int


@dataclass(frozen=True)
class Target:
    """Where the client and the server run (network namespaces) and where they meet."""

    client_netns: str
    server_netns: str
    address: str
    port: int


@dataclass(frozen=True)
class Churn:
    """What one `loadgen connect` run counted itself."""

    connections: int
    request_bytes: int
    reply_bytes: int
    errors: int
    seconds: float  # the requested duration: every thread stops starting connections then

    @property
    def rate(self) -> float:
        return self.connections / self.seconds


def build(workdir: Path) -> Path:
    binary = workdir / "loadgen"
    subprocess.run(
        ["gcc", "-O2", "-pthread", "-Wall", "-o", str(binary), str(SOURCE)],
        check=True,
    )
    return binary


def in_netns(netns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *args]


class Loadgen:
    def __init__(self, binary: Path, load: Load) -> None:
        self.binary = str(binary)
        self.load = load

    @contextmanager
    def serving(self, target: Target) -> Iterator[None]:
        """A server on target.address:port until the block ends."""
        load = self.load
        argv = in_netns(
            target.server_netns,
            *(self.binary, "serve", target.address, str(target.port)),
            *(str(load.server_threads), str(load.reply), str(load.request)),
        )
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "listening":
                raise RuntimeError(f"loadgen serve failed: {argv}")
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    def churn(self, target: Target, seconds: float) -> Churn:
        """Connections back to back for `seconds`; the counts loadgen made itself."""
        load = self.load
        argv = in_netns(
            target.client_netns,
            *(self.binary, "connect", target.address, str(target.port)),
            *(str(load.client_threads), str(seconds), str(load.request), str(load.reply)),
        )
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
        connections, request_bytes, reply_bytes, errors = (int(x) for x in out.stdout.split())
        return Churn(connections, request_bytes, reply_bytes, errors, seconds)

    def once(self, target: Target) -> float:
        """One connection; the time.monotonic() value at which the client closed it."""
        argv = in_netns(
            target.client_netns,
            *(self.binary, "once", target.address, str(target.port)),
            *(str(self.load.request), str(self.load.reply)),
        )
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
        return float(out.stdout)
