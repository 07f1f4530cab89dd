"""Test traffic with exactly known sizes, run inside a pod (network namespace).

Each request starts with a 9-byte header that counts as request bytes: total request
length (u32), reply length (u32), and who closes first (0 = server, 1 = client, 2 = the
client, with a reset: SO_LINGER 0), so a server needs no out-of-band agreement and every
closing order is exercised.

    traffic.py serve --bind ADDR --port P --count K
    traffic.py connect --host H --port P --plan REQ:REPLY:MODE[,...]
    traffic.py fail --host H --port P          (expects the connect to fail)
    traffic.py hold --host H --port P --request N --reply M
                                               (one exchange, then the connection stays
                                                open until a line arrives on stdin)
    traffic.py stream --host H --port P --request N --reply M
                                               (stdin lines "send K" write K of the N request
                                                bytes and answer "acked" once the peer has
                                                acknowledged them; "close" finishes)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import socket
import struct
import sys
import termios
import time

HEADER = struct.Struct("!IIB")


def read_exactly(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(min(65536, n - len(data)))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def wait_eof(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


def serve_one(conn: socket.socket) -> None:
    with conn:
        total, reply, mode = HEADER.unpack(read_exactly(conn, HEADER.size))
        read_exactly(conn, total - HEADER.size)
        conn.sendall(b"r" * reply)
        if mode == 1:
            wait_eof(conn)
        elif mode == 2:
            with contextlib.suppress(ConnectionResetError):
                wait_eof(conn)


def serve(bind: str, port: int, count: int) -> None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((bind, port))
        srv.listen(128)
        print("listening", flush=True)
        for _ in range(count):
            conn, _ = srv.accept()
            serve_one(conn)


def connect_one(host: str, port: int, request: int, reply: int, mode: int) -> None:
    with socket.create_connection((host, port), timeout=10) as conn:
        body = HEADER.pack(request, reply, mode) + b"q" * (request - HEADER.size)
        conn.sendall(body)
        read_exactly(conn, reply)
        if mode == 0:
            wait_eof(conn)
        elif mode == 2:  # close with a reset: the server's socket is reset by its peer
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def connect_hold(host: str, port: int, request: int, reply: int) -> None:
    """Like connect_one with the client closing, but only when told to on stdin."""
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(HEADER.pack(request, reply, 1) + b"q" * (request - HEADER.size))
        read_exactly(conn, reply)
        print("open", flush=True)
        sys.stdin.readline()
        conn.shutdown(socket.SHUT_WR)
        wait_eof(conn)


def wait_acked(conn: socket.socket) -> None:
    """Until every byte written has been acknowledged (the send queue is empty)."""
    while fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0" * 4) != b"\0" * 4:
        time.sleep(0.001)


def connect_stream(host: str, port: int, request: int, reply: int) -> None:
    """A long connection, driven line by line from stdin (see the module's docstring)."""
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.sendall(HEADER.pack(request, reply, 1))
        wait_acked(conn)
        print("acked", flush=True)
        for line in sys.stdin:
            verb, *arg = line.split()
            if verb == "close":
                break
            conn.sendall(b"q" * int(arg[0]))
            wait_acked(conn)
            print("acked", flush=True)
        read_exactly(conn, reply)
        conn.shutdown(socket.SHUT_WR)
        wait_eof(conn)


def connect_fail(host: str, port: int) -> int:
    """Connect where no connection can be made; print why it failed (errno name)."""
    try:
        socket.create_connection((host, port), timeout=30).close()
    except OSError as exc:
        json.dump({"error": errno.errorcode.get(exc.errno or 0, str(exc))}, sys.stdout)
        return 0
    json.dump({"error": None}, sys.stdout)
    return 1


def parse_plan(plan: str) -> list[tuple[int, int, int]]:
    steps = []
    for item in plan.split(","):
        request, reply, mode = (int(x) for x in item.split(":"))
        assert request >= HEADER.size, f"requests carry a {HEADER.size}-byte header"
        steps.append((request, reply, mode))
    return steps


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, default=1)
    c = sub.add_parser("connect")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--plan", required=True)
    f = sub.add_parser("fail")
    f.add_argument("--host", required=True)
    f.add_argument("--port", type=int, required=True)
    h = sub.add_parser("hold")
    h.add_argument("--host", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--request", type=int, required=True)
    h.add_argument("--reply", type=int, required=True)
    st = sub.add_parser("stream")
    st.add_argument("--host", required=True)
    st.add_argument("--port", type=int, required=True)
    st.add_argument("--request", type=int, required=True)
    st.add_argument("--reply", type=int, required=True)
    args = p.parse_args()
    if args.verb == "hold":
        connect_hold(args.host, args.port, args.request, args.reply)
        return 0
    if args.verb == "stream":
        connect_stream(args.host, args.port, args.request, args.reply)
        return 0
    if args.verb == "serve":
        serve(args.bind, args.port, args.count)
        return 0
    if args.verb == "fail":
        return connect_fail(args.host, args.port)
    plan = parse_plan(args.plan)
    for request, reply, mode in plan:
        connect_one(args.host, args.port, request, reply, mode)
    json.dump({"connections": len(plan)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
