"""An exact one-way delay between two network namespaces (netem is not in this kernel).

Opens a TUN device in each namespace and carries every IP packet from one to the other
unchanged, each released `--delay-ms` after it arrived:

    delay.py --ns NS_A --ns NS_B --delay-ms 20

prints "ready" once both devices exist (named kmdelay0, one per namespace); the caller
gives them addresses and routes. Runs until killed. Packets keep their order.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
DEVICE = "kmdelay0"


def enter(netns: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(fd)


def open_tun() -> int:
    """A TUN device in the current namespace; it lives as long as the descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def forward(a: int, b: int, delay_s: float) -> None:
    queue: collections.deque[tuple[float, int, bytes]] = collections.deque()
    peer = {a: b, b: a}
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        readable, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    queue.append((now + delay_s, peer[fd], os.read(fd, 65536)))
                except BlockingIOError:
                    break
        while queue and queue[0][0] <= time.monotonic():
            _, out, packet = queue.popleft()
            os.write(out, packet)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ns", action="append", required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    args = p.parse_args()
    fds = []
    for netns in args.ns:
        enter(netns)
        fds.append(open_tun())
    print("ready", flush=True)
    forward(fds[0], fds[1], args.delay_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
