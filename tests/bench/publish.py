"""Part six of `make bench`: one publish's CPU per flow, in this process, on the kernel's
own bytes (a probe whose maps hold what the real one would hand over).

    .venv/bin/python -m tests.bench.publish [--flows N] [--label-sets N] [--rounds R]

Scenarios, each timed over R publishes (the median):
- churn: N flow entries from N distinct peers of one workload, all changed since the last
  publish (each publish sees every entry grow): the fold's worst case, few label sets;
- steady: the same entries, unchanged (a quiet node with a full map);
- label sets: N/2 client workloads with one connection each to one server: N label sets
  a level, all changed, and their rendering;
- carryover, after each of the two above: saving the counters to metrics.state_file (at
  each retired generation and at stop) and restoring them at the next start, and the
  file's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kmeshd.accesslog.records import RecordFeed
from kmeshd.accesslog.sinks import Fanout
from kmeshd.aggregate import Ledger
from kmeshd.identity.model import Identities, Workload
from kmeshd.kernel.layout import Direction
from kmeshd.known import KnownAddresses
from kmeshd.publish import Publisher
from tests.fakes import FakeClock, FakeProbe, flow_key, flow_value, ip

SERVER = Workload(
    "server", "server", "bench", "server", "latest", "-", "Kubernetes", (ip("10.0.0.1"),)
)


def peer(i: int) -> str:
    return f"10.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


def publisher(probe: FakeProbe, ids: Identities) -> Publisher:
    clock = FakeClock()
    feed = RecordFeed(Fanout(), ids, 0, clock.monotonic)
    known = KnownAddresses(probe, clock.monotonic)
    return Publisher(probe, Ledger(max_series=1_000_000), None, None, feed, known, clock, 1e9)


def timed(pub: Publisher, ids: Identities, before: Any) -> float:
    before()
    started = time.perf_counter()
    pub.publish(ids, {"inventory": True})
    return time.perf_counter() - started


def carryover(pub: Publisher, ids: Identities, rounds: int) -> dict[str, Any]:
    """Save `pub`'s counters R times, and restore them into a new daemon's publisher."""
    with tempfile.TemporaryDirectory() as tmp:
        pub.state = Path(tmp) / "counters.json.gz"
        saves = []
        for _ in range(rounds):
            started = time.perf_counter()
            pub.save()
            saves.append(time.perf_counter() - started)
        restores = []
        for _ in range(rounds):
            other = publisher(FakeProbe(), ids)
            other.state = pub.state
            started = time.perf_counter()
            other.restore()
            restores.append(time.perf_counter() - started)
        assert other.ledger.readings() == pub.ledger.readings()
        return {
            "save_s": round(statistics.median(saves), 3),
            "restore_s": round(statistics.median(restores), 3),
            "file_bytes": pub.state.stat().st_size,
        }


def churn(flows: int, rounds: int) -> dict[str, Any]:
    """Every entry changed at every publish."""
    ids = Identities((SERVER,))
    probe = FakeProbe()
    keys = [flow_key(peer(i), "10.0.0.1", 80, Direction(1 + i % 2)) for i in range(flows)]
    pub = publisher(probe, ids)
    times, steady = [], []
    for r in range(rounds):
        value = flow_value(r + 1, r + 1, 10 * (r + 1), 5 * (r + 1))

        def grow(v: bytes = value) -> None:
            probe.flows_map = dict.fromkeys(keys, v)

        times.append(timed(pub, ids, grow))
        steady.append(timed(pub, ids, lambda: None))
    return {
        "flows": flows,
        "changed_us_per_flow": round(statistics.median(times) / flows * 1e6, 2),
        "steady_us_per_flow": round(statistics.median(steady) / flows * 1e6, 2),
        "changed_publish_s": round(statistics.median(times), 3),
        "steady_publish_s": round(statistics.median(steady), 3),
        "carryover": carryover(pub, ids, rounds),
    }


def label_sets(n: int, rounds: int) -> dict[str, Any]:
    clients = [
        Workload(f"c-{i}", f"c-{i}", "bench", f"c-{i}", "latest", "-", "Kubernetes", (ip(peer(i)),))
        for i in range(n // 2)
    ]
    ids = Identities((SERVER, *clients))
    probe = FakeProbe()
    keys = [
        flow_key(peer(i), "10.0.0.1", 80, direction)
        for i in range(n // 2)
        for direction in (Direction.OUTBOUND, Direction.INBOUND)
    ]
    pub = publisher(probe, ids)
    times = []
    for r in range(rounds):
        value = flow_value(r + 1, r + 1, 10 * (r + 1), 5 * (r + 1))

        def grow(v: bytes = value) -> None:
            probe.flows_map = dict.fromkeys(keys, v)

        times.append(timed(pub, ids, grow))
    return {
        "label_sets_per_level": len(pub.ledger.workload),
        "publish_s": round(statistics.median(times), 3),
        "body_bytes": pub.body.size,
        "gzip_bytes": len(pub.body.gzip),
        "carryover": carryover(pub, ids, rounds),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.publish", description=__doc__)
    p.add_argument("--flows", type=int, default=65536)
    p.add_argument("--label-sets", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "publish.json")
    args = p.parse_args()
    result = {
        "churn": churn(args.flows, args.rounds),
        "label_sets": label_sets(args.label_sets, args.rounds),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
