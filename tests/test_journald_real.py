"""JournaldSink against a real systemd-journald: what journalctl finds is what was sent."""

from __future__ import annotations

import uuid
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from kmeshd.accesslog.render import MESSAGE_ID, AccessRecord, journal_fields
from kmeshd.accesslog.sinks import SNDBUF, JournaldSink, encode_native
from tests.journald import Journald
from tests.test_render import SEED
from tests.test_sinks import too_big_for_a_datagram

pytestmark = pytest.mark.consumers


def sent_fields(entry: dict[str, object], r: AccessRecord) -> dict[str, object]:
    """The fields of a journal entry that kmeshd set (journald adds its trusted _* ones)."""
    return {key: entry.get(key) for key in journal_fields(r)}


def test_records_are_found_by_identifier_and_workload(journald: Journald) -> None:
    """`journalctl -t kmeshd KMESHD_DST_WORKLOAD=<pod>` returns each record's exact fields."""
    pod = f"productpage-{uuid.uuid4().hex[:10]}"
    records = [
        replace(SEED, dst_workload=pod),
        replace(
            SEED,
            dst_workload=pod,
            src_addr="[fd00::17]:40000",
            dst_addr="[fd00::11]:80",
            duration_ns=850_000,
        ),
        replace(
            SEED,
            dst_workload=pod,
            direction="OUTBOUND",
            sent_bytes=0,
            received_bytes=0,
            duration_ns=1_000_512_000,
            failure_reason="refused",
        ),
        replace(SEED, dst_workload="someone-else"),
    ]
    sink = JournaldSink(journald.socket_path)
    assert [sink.write(r) for r in records] == [True] * 4
    sink.close()
    assert (sink.up, sink.dropped) == (True, 0)

    entries = journald.query("-t", "kmeshd", f"KMESHD_DST_WORKLOAD={pod}")

    assert [sent_fields(e, r) for e, r in zip(entries, records, strict=False)] == [
        journal_fields(r) for r in records[:3]
    ]
    assert len(entries) == 3
    assert {e["MESSAGE_ID"] for e in entries} == {MESSAGE_ID}
    assert entries[1]["KMESHD_DURATION"] == "850µs"
    assert entries[2]["KMESHD_FAILURE_REASON"] == "refused"
    assert entries[0]["MESSAGE"] == (
        "src.addr=10.244.0.17:51842, src.workload=prometheus-5fb7f6f8d8-h9cts, "
        "src.namespace=istio-system, dst.addr=10.244.0.13:9080, "
        "dst.service=productpage.echo-1-27855.svc.cluster.local, "
        f"dst.workload={pod}, dst.namespace=echo-1-27855, direction=INBOUND, "
        "sent_bytes=5, received_bytes=292, duration=2.733902ms"
    )


def test_an_entry_too_large_for_a_datagram_arrives_through_a_memfd(
    journald: Journald,
) -> None:
    """A record larger than the socket's datagram limit reaches the journal whole, via memfd."""
    pod = f"big-{uuid.uuid4().hex[:10]}"
    big = replace(SEED, dst_workload=pod, dst_service="s" * SNDBUF + ".svc.cluster.local")
    assert too_big_for_a_datagram(journald.socket_path, encode_native(journal_fields(big)))

    with closing(JournaldSink(journald.socket_path)) as sink:
        assert sink.write(big)

    entries = journald.query("-t", "kmeshd", f"KMESHD_DST_WORKLOAD={pod}")
    assert [sent_fields(e, big) for e in entries] == [journal_fields(big)]


def test_a_value_with_a_newline_arrives_intact(journald: Journald) -> None:
    """The binary field form carries a value containing newlines to journald unchanged."""
    pod = f"nl-{uuid.uuid4().hex[:10]}"
    odd = replace(SEED, dst_workload=pod, dst_service="line one\nline two\n")
    with closing(JournaldSink(journald.socket_path)) as sink:
        assert sink.write(odd)

    entries = journald.query("-t", "kmeshd", f"KMESHD_DST_WORKLOAD={pod}")
    assert [sent_fields(e, odd) for e in entries] == [journal_fields(odd)]


def test_a_sink_started_before_journald_recovers_when_it_appears(
    journald: Journald,
    tmp_path: Path,
) -> None:
    """A sink down because the socket was missing delivers once journald's socket exists."""
    now = [0.0]
    pod = f"late-{uuid.uuid4().hex[:10]}"
    where = tmp_path / "socket"
    sink = JournaldSink(str(where), clock=lambda: now[0])
    assert (sink.up, sink.write(replace(SEED, dst_workload=pod)), sink.dropped) == (False, False, 1)

    where.symlink_to(journald.socket_path)  # journald appears where the sink looks
    now[0] += 10
    assert sink.write(replace(SEED, dst_workload=pod, sent_bytes=6))
    sink.close()
    assert (sink.up, sink.dropped) == (True, 1)

    entries = journald.query("-t", "kmeshd", f"KMESHD_DST_WORKLOAD={pod}")
    assert [e["KMESHD_SENT_BYTES"] for e in entries] == ["6"]


def test_a_burst_the_size_of_systemds_queue_is_taken_whole(journald: Journald) -> None:
    """500 records sent at once (under systemd's 512-datagram queue) all reach the journal."""
    pod = f"burst-{uuid.uuid4().hex[:10]}"
    with closing(JournaldSink(journald.socket_path)) as sink:
        results = [sink.write(replace(SEED, dst_workload=pod, sent_bytes=i)) for i in range(500)]
    assert (results.count(True), sink.dropped) == (500, 0)

    entries = journald.query(
        "-t", "kmeshd", f"KMESHD_DST_WORKLOAD={pod}", "--output-fields=KMESHD_SENT_BYTES"
    )
    assert [e["KMESHD_SENT_BYTES"] for e in entries] == [str(i) for i in range(500)]


def test_a_burst_ten_times_journalds_queue_is_taken_whole(journald: Journald) -> None:
    """5,000 records sent as fast as they come (accesslog.max_rate = 0): journald's queue
    fills again and again, the sink waits for room, and every record is in the journal."""
    pod = f"flood-{uuid.uuid4().hex[:10]}"
    with closing(JournaldSink(journald.socket_path)) as sink:
        results = [sink.write(replace(SEED, dst_workload=pod, sent_bytes=i)) for i in range(5000)]
    assert (results.count(True), sink.dropped) == (5000, 0)
    entries = journald.query(
        "-t", "kmeshd", f"KMESHD_DST_WORKLOAD={pod}", "--output-fields=KMESHD_SENT_BYTES"
    )
    assert [e["KMESHD_SENT_BYTES"] for e in entries] == [str(i) for i in range(5000)]
