"""kmeshd.accesslog.query and `kmeshd accesslog`: filters as journalctl matches, journal
entries rendered back, and the whole verb against a real systemd-journald."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest

from kmeshd.accesslog.query import Filters, journalctl_args, record_fields, render, text, wanted
from kmeshd.accesslog.render import (
    MESSAGE_ID,
    AccessRecord,
    fields,
    journal_fields,
    message,
    text_line,
)
from kmeshd.accesslog.sinks import JournaldSink
from tests.journald import Journald
from tests.test_render import FAILED, IPV6, SEED

BASE = ["journalctl", "--output=json", "--all", "--no-pager"]
ID = f"MESSAGE_ID={MESSAGE_ID}"


def printed(r: AccessRecord) -> str:
    """What `kmeshd accesslog` prints for the record `r`."""
    return text_line(r.time_ns, message(r))


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (Filters(), [*BASE, ID]),
        (
            Filters(since="-1h", follow=True, directory="/j"),
            [*BASE, "--directory=/j", "--since=-1h", "--follow", ID],
        ),
        (
            Filters(src_workload="a", dst_workload="b", direction="inbound"),
            [
                *BASE,
                ID,
                "KMESHD_SRC_WORKLOAD=a",
                "KMESHD_DST_WORKLOAD=b",
                "KMESHD_DIRECTION=INBOUND",
            ],
        ),
        (  # a hostname is matched by journalctl; a short name is not (see `wanted`)
            Filters(service="web.shop.svc.cluster.local"),
            [*BASE, ID, "KMESHD_DST_SERVICE=web.shop.svc.cluster.local"],
        ),
        (Filters(service="web"), [*BASE, ID]),
        (  # repeated values of one field: journalctl ORs them
            Filters(failed=True),
            [
                *BASE,
                ID,
                "KMESHD_FAILURE_REASON=refused",
                "KMESHD_FAILURE_REASON=timeout",
                "KMESHD_FAILURE_REASON=other",
            ],
        ),
        (  # either side: every other term repeated on both sides of "+"
            Filters(namespace="shop", direction="outbound"),
            [
                *BASE,
                ID,
                "KMESHD_DIRECTION=OUTBOUND",
                "KMESHD_SRC_NAMESPACE=shop",
                "+",
                ID,
                "KMESHD_DIRECTION=OUTBOUND",
                "KMESHD_DST_NAMESPACE=shop",
            ],
        ),
    ],
)
def test_journalctl_args(filters: Filters, expected: list[str]) -> None:
    assert journalctl_args(filters) == expected


@pytest.mark.parametrize(
    ("service", "hostname", "expected"),
    [
        (None, "web.shop.svc.cluster.local", True),
        ("web", "web.shop.svc.cluster.local", True),
        ("web", "webapp.shop.svc.cluster.local", False),
        ("web", "-", False),
        ("web.shop.svc.cluster.local", "anything", True),  # journalctl matched it already
    ],
)
def test_short_service_names(service: str | None, hostname: str, expected: bool) -> None:
    assert wanted({"KMESHD_DST_SERVICE": hostname}, Filters(service=service)) is expected


def as_journalctl_prints(r: Any) -> dict[str, object]:
    """What `journalctl -o json` prints for an entry the journald sink sent."""
    return {**journal_fields(r), "__REALTIME_TIMESTAMP": "1726301967000000", "_PID": "4242"}


@pytest.mark.parametrize("record", [SEED, IPV6, FAILED], ids=["seed", "ipv6", "failed"])
def test_entries_render_as_the_daemon_writes(record: Any) -> None:
    """Read back, a record is the file sink's JSON object and the daemon's text line."""
    entry = as_journalctl_prints(record)
    assert record_fields(entry) == fields(record)
    assert list(record_fields(entry)) == list(fields(record))  # same key order
    assert text(entry) == printed(record)


def test_fractions_and_non_utf8_fields() -> None:
    """A whole second has no fraction; a field journalctl prints as bytes is decoded."""
    whole = replace(SEED, time_ns=1726301966_000000000)
    entry = as_journalctl_prints(whole)
    assert text(entry) == printed(whole)
    entry["KMESHD_SRC_WORKLOAD"] = list(b"caf\xc3\xa9-\xff")
    assert record_fields(entry)["src.workload"] == "café-\ufffd"


def test_render_skips_blank_lines_and_filters() -> None:
    lines = [
        json.dumps(as_journalctl_prints(SEED)),
        "",
        json.dumps(as_journalctl_prints(IPV6)),
    ]
    out = list(render(lines, Filters(service="httpbin"), "json"))
    assert [json.loads(line) for line in out] == [fields(IPV6)]


# -- the verb, against a real journald ---------------------------------------------------


def accesslog(journald: Journald, *args: str) -> subprocess.CompletedProcess[str]:
    journald.query()  # journalctl --sync: everything sent is on disk
    return subprocess.run(
        [sys.executable, "-m", "kmeshd.cli", "accesslog", "-D", journald.journal_dir, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.consumers
def test_accesslog_reads_back_from_journald(journald: Journald) -> None:
    """Records sent by the journald sink come back through `kmeshd accesslog`, filtered,
    as text and as JSON; other programs' entries never show."""
    other_ns = replace(
        IPV6,
        src_namespace="shop",
        dst_namespace="default",
        dst_workload="cart-1",
        src_workload="ui-1",
    )
    records = [SEED, IPV6, FAILED, other_ns]
    sink = JournaldSink(journald.socket_path)
    assert all(sink.write(r) for r in records)
    sink.close()
    subprocess.run(
        [
            "logger",
            "--socket-errors=on",
            "-u",
            journald.syslog_path,
            "-t",
            "kmeshd",
            "not a record",
        ],
        check=True,
    )

    def lines(*args: str) -> list[str]:
        done = accesslog(journald, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    assert lines() == [printed(r) for r in records]
    assert [json.loads(x) for x in lines("--output", "json")] == [fields(r) for r in records]
    assert lines("--failed") == [printed(FAILED)]
    assert lines("--namespace", "shop") == [printed(other_ns)]
    assert lines("--namespace", "default") == [printed(IPV6), printed(other_ns)]
    assert lines("--direction", "OUTBOUND") == [printed(FAILED)]
    assert lines("--service", "httpbin") == [printed(IPV6), printed(other_ns)]
    assert lines("--service", SEED.dst_service) == [printed(SEED), printed(FAILED)]
    assert lines("--dst-workload", "cart-1", "--src-workload", "ui-1") == [printed(other_ns)]
    assert lines("--since", "2000-01-01", "--dst-workload", "nobody") == []


@pytest.mark.consumers
def test_accesslog_passes_journalctl_errors_on(journald: Journald) -> None:
    """A --since journalctl cannot parse: its own message, and a failing exit status."""
    done = accesslog(journald, "--since", "the day before yesterday-ish")
    assert done.returncode == 1
    assert "timestamp" in done.stderr.lower()
    assert done.stdout == ""
