"""`make bench`, part ten: where per-socket state could live, measured. A benchmark, not a
test: it prints a table, writes JSON, and fails only if it cannot run.

    .venv/bin/python -m tests.bench.storage [--rounds N] [--seconds S] [--out FILE]  # 6, 2

The socket sweep needs each tracked socket's state and a way to reach the socket from
every network namespace. kmeshd keeps the state in a hash keyed by socket cookie and
reaches sockets through open files (bpf_iter__task_file). The other way is socket-local
storage, whose map iterator (bpf_iter__bpf_sk_storage_map) hands over each socket with
its state. What each costs a connection is what its state costs at the start and the end:
two minimal sock_ops programs, each keeping a 104-byte state (struct sock_state's size)
per socket from connect/accept to close, one in a hash like kmeshd's (131,072 entries,
preallocated), one in socket-local storage, are attached in turn in the loopback
scenario; N rounds alternate none / hash / storage churns of S seconds. Per variant: the
churn's connections a second against none in the same round, and the program's run time
per connection as the kernel times it (kernel.bpf_stats_enabled=1 throughout, for every
variant alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from kmeshd.kernel import cgroup
from kmeshd.kernel.attach import BPF_CGROUP_SOCK_OPS
from kmeshd.kernel.build import import_bcc
from kmeshd.kernel.libbpf import LibBpf
from tests.bench import loadgen
from tests.bench.probes import bpf_stats, prog_stats
from tests.bench.scenarios import all_scenarios

STATE_BYTES = 104
SOURCE = """
struct state { __u8 bytes[STATE_BYTES]; };
BPF_TABLE("hash", __u64, struct state, socks, 131072);
BPF_SK_STORAGE(store, struct state);

static __always_inline void watch_close(struct bpf_sock_ops *ctx)
{
    bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

int kmeshd_bench_hash(struct bpf_sock_ops *ctx)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct state st = {};
    switch (ctx->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        if (socks.update(&cookie, &st) == 0)
            watch_close(ctx);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (ctx->args[1] == BPF_TCP_CLOSE && socks.lookup(&cookie))
            socks.delete(&cookie);
        break;
    }
    return 1;
}

int kmeshd_bench_stor(struct bpf_sock_ops *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    switch (ctx->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        if (store.sk_storage_get(sk, NULL, BPF_SK_STORAGE_GET_F_CREATE))
            watch_close(ctx);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (ctx->args[1] == BPF_TCP_CLOSE && store.sk_storage_get(sk, NULL, 0))
            store.sk_storage_delete(sk);
        break;
    }
    return 1;
}
"""
VARIANTS = {"hash": "kmeshd_bench_hash", "storage": "kmeshd_bench_stor"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.storage", description=__doc__)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "storage.json")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    bcc = import_bcc()
    bpf = bcc.BPF(text=SOURCE, cflags=[f"-DSTATE_BYTES={STATE_BYTES}"])
    progs = {name: bpf.load_func(fn, bcc.BPF.SOCK_OPS).fd for name, fn in VARIANTS.items()}
    libbpf = LibBpf()
    root = cgroup.directory("auto", "bench")
    rates: dict[str, list[float]] = {"none": [], "hash": [], "storage": []}
    ns_per_conn: dict[str, list[float]] = {"hash": [], "storage": []}
    with tempfile.TemporaryDirectory(prefix="kmeshd-bench-storage-") as tmp, bpf_stats():
        gen = loadgen.Loadgen(loadgen.build(Path(tmp)), loadgen.Load(4, 4, 128, 512))
        with all_scenarios() as scenarios:
            target = scenarios[0].target  # loopback
            with gen.serving(target):
                gen.churn(target, 1.0)  # warm up
                for i in range(args.rounds):
                    order = ["none", "hash", "storage"]
                    order = order[i % 3 :] + order[: i % 3]
                    for variant in order:
                        churn, per_conn = run_one(
                            gen, target, args.seconds, variant, progs, libbpf, root
                        )
                        rates[variant].append(churn)
                        if per_conn is not None:
                            ns_per_conn[variant].append(per_conn)
                        print(f"round {i + 1} {variant}: {churn:,.0f} conn/s", flush=True)
    bpf.cleanup()
    results: dict[str, Any] = {"rounds": args.rounds, "seconds": args.seconds, "variants": {}}
    print(f"\nper-socket state: {args.rounds} rounds of {args.seconds:g} s churns (loopback)")
    print(f"{'state in':<10}{'conn/s':>10}{'ratio to none':>15}{'µs per connection':>19}")
    for variant in ("hash", "storage"):
        ratios = [r / n for r, n in zip(rates[variant], rates["none"], strict=True)]
        row = {
            "rate_median": statistics.median(rates[variant]),
            "ratio_median": statistics.median(ratios),
            "us_per_connection_median": statistics.median(ns_per_conn[variant]) / 1000,
        }
        results["variants"][variant] = row
        print(
            f"{variant:<10}{row['rate_median']:>10,.0f}{row['ratio_median']:>15.3f}"
            f"{row['us_per_connection_median']:>19.3f}"
        )
    results["none_rate_median"] = statistics.median(rates["none"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


def run_one(
    gen: loadgen.Loadgen,
    target: loadgen.Target,
    seconds: float,
    variant: str,
    progs: dict[str, int],
    libbpf: LibBpf,
    root: Path,
) -> tuple[float, float | None]:
    """One churn with `variant`'s program attached (none: nothing): its rate, and the
    program's run time per connection."""
    if variant == "none":
        return gen.churn(target, seconds).rate, None
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = libbpf.check(
            libbpf.link_create(progs[variant], fd, BPF_CGROUP_SOCK_OPS, None), "link"
        )
    finally:
        os.close(fd)
    try:
        before = prog_stats(VARIANTS[variant][:15])
        churn = gen.churn(target, seconds)
        after = prog_stats(VARIANTS[variant][:15])
    finally:
        libbpf.link_detach(link)
        os.close(link)
    return churn.rate, (after.run_time_ns - before.run_time_ns) / churn.connections


if __name__ == "__main__":
    sys.exit(main())
