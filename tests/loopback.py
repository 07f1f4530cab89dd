"""Many short connections on loopback, from as many source addresses as wanted (all of
127.0.0.0/8 is local, so no address has to be added): what a node sees from a churning
set of peers, at a known count and size.

Each connection sends REQUEST bytes, reads the server's REPLY bytes, and closes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

REQUEST = b"0123456789"  # 10 bytes: received_bytes per connection
REPLY = b"hello"  # 5 bytes: sent_bytes per connection


def address(block: int, i: int) -> str:
    """The i-th source address of a block: 127.<block>.<i // 250>.<i % 250 + 1>."""
    return f"127.{block}.{i // 250}.{i % 250 + 1}"


def inventory(server: str, clients: Iterable[tuple[str, str]], namespace: str) -> str:
    """An inventory naming a workload "server" at `server`, and each (name, address) client."""
    workloads = [("server", server), *clients]
    return "".join(
        f'[[workload]]\nname = "{name}"\nnamespace = "{namespace}"\naddresses = ["{ip}"]\n'
        for name, ip in workloads
    )


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _serve(listener: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return  # closed
        with conn:
            if _read(conn, len(REQUEST)) == REQUEST:
                conn.sendall(REPLY)


@contextmanager
def server(host: str, port: int, threads: int = 4) -> Iterator[None]:
    """A server answering REPLY to each REQUEST on host:port, until the block ends."""
    listener = socket.create_server((host, port), backlog=4096)
    listener.settimeout(0.2)
    stop = threading.Event()
    workers = [
        threading.Thread(target=_serve, args=(listener, stop), daemon=True) for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(5)
        listener.close()


def connect(source: str, host: str, port: int) -> None:
    """One exchange from `source`; raises if the reply was not whole."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(REQUEST)
        if _read(s, len(REPLY)) != REPLY:
            raise ConnectionError(f"{source}: short reply")
        s.recv(1)  # the server's FIN: its socket closes first


def connect_all(sources: Sequence[str], host: str, port: int, threads: int = 4) -> int:
    """One exchange from each source (in `threads` threads); returns how many."""
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(lambda source: connect(source, host, port), sources))
    return len(done)
