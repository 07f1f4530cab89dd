"""Building the probe: the host checks, what the probe needs to know of the running kernel
(offsets from its BTF, as -D defines), and bcc's compile of bpf/tcp_probe.c.

The kernel headers bcc compiles against need not describe the running kernel (Debian's
headers package is often older), so the few struct tcp_sock fields the probe reads come
from /sys/kernel/btf/vmlinux, the kernel's own description of its types: what libbpf's
CO-RE relocations would do, for a handful of fields.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kmeshd.errors import UnavailableError
from kmeshd.kernel import btf
from kmeshd.kernel.memory import release_compiler_pages, release_freed_memory

# Map sizes, passed to the probe as -D defines (the flows map's comes from bpf.max_flows).
KNOWN_MAX = 65536
SOCKS_MAX = 131072  # tracked sockets open at once; preallocated: 21 MiB of kernel memory
RINGBUF_PAGES = 1024  # 4 MiB: about 40,000 records between two polls

# The struct tcp_sock fields the probe reads, each as the -D define that carries its offset
# into the probe, its member path, and the size the probe reads. At every close:
CLOSE_FIELDS = {
    "SOCK_FLAGS_OFF": ("inet_conn.icsk_inet.sk.__sk_common.skc_flags", 8),  # sk_flags
    "SOCK_ERR_OFF": ("inet_conn.icsk_inet.sk.sk_err", 4),  # what tcp_reset() sets
}
# Enum members the probe tests, each as its -D define: SOCK_DONE is the sk_flags bit that
# tcp_fin() sets as it takes the peer's FIN.
ENUM_VALUES = {"SOCK_DONE_BIT": ("sock_flags", "SOCK_DONE")}
# And in the socket sweep (bpf.live_updates):
SWEEP_FIELDS = {
    "TCP_STATE_OFF": ("inet_conn.icsk_inet.sk.__sk_common.skc_state", 1),
    "TCP_BYTES_ACKED_OFF": ("bytes_acked", 8),
    "TCP_BYTES_RECEIVED_OFF": ("bytes_received", 8),
    "TCP_TOTAL_RETRANS_OFF": ("total_retrans", 4),
    "TCP_DSACK_DUPS_OFF": ("dsack_dups", 4),
    "TCP_SRTT_US_OFF": ("srtt_us", 4),
    "TCP_MIN_RTT_OFF": ("rtt_min.s.v", 4),  # struct minmax: s[0] holds the minimum
    "TCP_SEGS_IN_OFF": ("segs_in", 4),
    "TCP_SEGS_OUT_OFF": ("segs_out", 4),
    "TCP_COOKIE_OFF": ("inet_conn.icsk_inet.sk.__sk_common.skc_cookie", 8),
    "TCP_SLOCK_OFF": ("inet_conn.icsk_inet.sk.sk_lock.slock", 4),
    "TCP_OWNED_OFF": ("inet_conn.icsk_inet.sk.sk_lock.owned", 4),
}
# And of struct socket, where the sweep finds the socket behind an open file:
SOCKET_FIELDS = {"SOCKET_SK_OFF": ("sk", 8)}
NO_SWEEP = "set bpf.live_updates = false to count open connections' bytes at their close only"


def bpf_source_dir() -> Path:
    """bpf/ beside the package in a checkout; /usr/share/kmeshd/bpf when installed."""
    override = os.environ.get("KMESHD_BPF_DIR")
    candidates = [Path(override)] if override else []
    candidates += [Path(__file__).resolve().parents[2] / "bpf", Path("/usr/share/kmeshd/bpf")]
    for path in candidates:
        if (path / "tcp_probe.c").is_file():
            return path
    raise UnavailableError(
        "the BPF source tcp_probe.c is missing (looked in "
        + ", ".join(map(str, candidates))
        + "): reinstall kmeshd"
    )


def check_host(release: str | None = None, modules: Path = Path("/lib/modules")) -> None:
    """Fail fast, with the fix, on what bcc and the probe need: Linux 5.12, for the sock_ops
    program's compare-and-swap (BPF atomics came in 5.12; the ring buffer in 5.8,
    BTF-typed socket pointers in networking programs in 5.10), which covers the socket
    sweep's needs too (a file iterator since 5.8, bpf_sock_from_file since 5.11)."""
    release = release or os.uname().release
    major, minor = (int(x) for x in release.split(".")[:2])
    if (major, minor) < (5, 12):
        raise UnavailableError(
            f"kernel {release} is too old: kmeshd needs Linux 5.12 or newer (BPF atomic"
            " compare-and-swap)"
        )
    build = modules / release / "build"
    if not (build / "include").is_dir():
        raise UnavailableError(
            f"no kernel headers at {build}: bcc compiles the probe against them; "
            "install linux-headers-amd64 and link /usr/src/linux-headers-<ver>-amd64 there "
            "(`make kernel-headers` does both)"
        )


def tcp_sock_offsets(
    kernel: btf.Btf, fields: dict[str, tuple[str, int]], struct: str = "tcp_sock"
) -> dict[str, int]:
    """The defines' offsets in the running kernel; BtfError names a field that is missing
    or not the size the probe reads."""
    offsets = {}
    for define, (path, size) in fields.items():
        found = kernel.field(struct, path)
        if found.size != size:
            raise btf.BtfError(f"{struct}.{path} is {found.size} bytes, the probe reads {size}")
        offsets[define] = found.offset
    return offsets


def sweep_offsets(kernel: btf.Btf) -> dict[str, int]:
    return tcp_sock_offsets(kernel, SWEEP_FIELDS) | tcp_sock_offsets(
        kernel, SOCKET_FIELDS, "socket"
    )


def close_defines(kernel: btf.Btf) -> dict[str, int]:
    defines = tcp_sock_offsets(kernel, CLOSE_FIELDS)
    for define, (enum, member) in ENUM_VALUES.items():
        defines[define] = kernel.enum_value(enum, member)
    return defines


def kernel_defines(sweep: bool) -> dict[str, int]:
    """What the probe needs to know of the running kernel's types, as -D defines."""
    try:
        kernel = btf.load()
        defines = close_defines(kernel)
    except btf.BtfError as exc:
        raise UnavailableError(
            f"the probe cannot find what it reads in the kernel's BTF ({exc}): kmeshd needs a"
            " kernel built with CONFIG_DEBUG_INFO_BTF=y, which publishes /sys/kernel/btf/vmlinux"
        ) from exc
    if sweep:
        try:
            defines |= sweep_offsets(kernel)
        except btf.BtfError as exc:
            raise UnavailableError(
                f"the socket sweep cannot find its fields in the kernel's BTF ({exc}): {NO_SWEEP}"
            ) from exc
    return defines


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise UnavailableError(
            f"the bcc Python bindings cannot be imported ({exc}): "
            "apt-get install python3-bpfcc, and run kmeshd with /usr/bin/python3"
        ) from exc
    return bcc


def compile_probe(bcc: Any, pins: Path, kernel: dict[str, int], max_flows: int) -> Any:
    """bcc's BPF object, maps pinned under `pins`, the flows map of `max_flows` entries.
    `kernel`: kernel_defines(); without the sweep's, the probe has no socket sweep."""
    src = bpf_source_dir()
    cflags = [f"-D{define}={value}" for define, value in kernel.items()]
    cflags += [
        f"-I{src}",
        f'-DPIN_DIR="{pins}"',
        f"-DFLOWS_MAX={max_flows}",
        f"-DKNOWN_MAX={KNOWN_MAX}",
        f"-DSOCKS_MAX={SOCKS_MAX}",
        f"-DRINGBUF_PAGES={RINGBUF_PAGES}",
    ]
    try:
        bpf = bcc.BPF(src_file=str(src / "tcp_probe.c").encode(), cflags=cflags)
    except Exception as exc:
        raise UnavailableError(f"bcc could not compile or load the probe: {exc}") from exc
    release_freed_memory()
    release_compiler_pages()
    return bpf
