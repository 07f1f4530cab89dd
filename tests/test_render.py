"""Rendering access records: JSON fields, the seed's text, journal fields, Go durations."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kmeshd.accesslog.render import (
    JSON_KEYS,
    MESSAGE_ID,
    AccessRecord,
    fields,
    go_duration,
    go_time,
    journal_fields,
    journal_key,
    message,
    rfc3339,
    text_line,
)

# The seed document's INBOUND example, closed at 2024-09-14 08:19:26.552709932 UTC.
SEED = AccessRecord(
    time_ns=1726301966552709932,
    src_addr="10.244.0.17:51842",
    src_workload="prometheus-5fb7f6f8d8-h9cts",
    src_namespace="istio-system",
    dst_addr="10.244.0.13:9080",
    dst_service="productpage.echo-1-27855.svc.cluster.local",
    dst_workload="productpage-v1-8499c849b9-bz9t9",
    dst_namespace="echo-1-27855",
    direction="INBOUND",
    sent_bytes=5,
    received_bytes=292,
    duration_ns=2733902,
    failure_reason=None,
    srtt_us=412,
    min_rtt_us=97,
    retransmits=0,
    segs_in=6,
    segs_out=5,
)
SEED_MESSAGE = (
    "src.addr=10.244.0.17:51842, src.workload=prometheus-5fb7f6f8d8-h9cts, "
    "src.namespace=istio-system, dst.addr=10.244.0.13:9080, "
    "dst.service=productpage.echo-1-27855.svc.cluster.local, "
    "dst.workload=productpage-v1-8499c849b9-bz9t9, dst.namespace=echo-1-27855, "
    "direction=INBOUND, sent_bytes=5, received_bytes=292, duration=2.733902ms"
)
IPV6 = replace(
    SEED,
    src_addr="[fd00::17]:51842",
    dst_addr="[fd00::11]:80",
    dst_service="httpbin.default.svc.cluster.local",
    dst_workload="httpbin-5c5944c58c-v9mlk",
    dst_namespace="default",
    duration_ns=850_000,
)
FAILED = replace(
    SEED,
    dst_addr="10.244.0.13:9081",
    direction="OUTBOUND",
    sent_bytes=0,
    received_bytes=0,
    duration_ns=1_000_512_000,
    failure_reason="refused",
    srtt_us=0,
    min_rtt_us=0,
)
# A long transfer: byte counts past 32 bits (and the largest 64-bit one) print whole.
LARGE = replace(SEED, sent_bytes=5_000_000_001, received_bytes=2**64 - 1)
UNKNOWN = replace(
    SEED,
    src_workload="-",
    src_namespace="-",
    dst_service="-",
    dst_workload="-",
    dst_namespace="-",
    sent_bytes=0,
    received_bytes=0,
    duration_ns=0,
)


def test_fields_of_the_seed_example() -> None:
    """The seed's example renders to the documented JSON keys, values and order."""
    assert list(fields(SEED).items()) == [
        ("time", "2024-09-14T08:19:26.552709932Z"),
        ("src.addr", "10.244.0.17:51842"),
        ("src.workload", "prometheus-5fb7f6f8d8-h9cts"),
        ("src.namespace", "istio-system"),
        ("dst.addr", "10.244.0.13:9080"),
        ("dst.service", "productpage.echo-1-27855.svc.cluster.local"),
        ("dst.workload", "productpage-v1-8499c849b9-bz9t9"),
        ("dst.namespace", "echo-1-27855"),
        ("direction", "INBOUND"),
        ("sent_bytes", 5),
        ("received_bytes", 292),
        ("duration", "2.733902ms"),
        ("duration_ns", 2733902),
        ("srtt_us", 412),
        ("min_rtt_us", 97),
        ("retransmits", 0),
        ("segs_in", 6),
        ("segs_out", 5),
    ]


def test_message_of_the_seed_example() -> None:
    """MESSAGE is the seed's text, field for field."""
    assert message(SEED) == SEED_MESSAGE


def test_text_line_of_the_seed_example() -> None:
    """The text line is the seed's line: Go's time, then the message."""
    assert (
        text_line(SEED.time_ns, message(SEED))
        == "accesslog: 2024-09-14 08:19:26.552709932 +0000 UTC " + SEED_MESSAGE
    )


def test_journal_fields_of_the_seed_example() -> None:
    """Journal fields are MESSAGE, the fixed ids, then every JSON key as KMESHD_*."""
    assert list(journal_fields(SEED).items()) == [
        ("MESSAGE", SEED_MESSAGE),
        ("MESSAGE_ID", "2fbe419c00fb412cafa2600c22093fd2"),
        ("SYSLOG_IDENTIFIER", "kmeshd"),
        ("PRIORITY", "6"),
        ("KMESHD_TIME", "2024-09-14T08:19:26.552709932Z"),
        ("KMESHD_SRC_ADDR", "10.244.0.17:51842"),
        ("KMESHD_SRC_WORKLOAD", "prometheus-5fb7f6f8d8-h9cts"),
        ("KMESHD_SRC_NAMESPACE", "istio-system"),
        ("KMESHD_DST_ADDR", "10.244.0.13:9080"),
        ("KMESHD_DST_SERVICE", "productpage.echo-1-27855.svc.cluster.local"),
        ("KMESHD_DST_WORKLOAD", "productpage-v1-8499c849b9-bz9t9"),
        ("KMESHD_DST_NAMESPACE", "echo-1-27855"),
        ("KMESHD_DIRECTION", "INBOUND"),
        ("KMESHD_SENT_BYTES", "5"),
        ("KMESHD_RECEIVED_BYTES", "292"),
        ("KMESHD_DURATION", "2.733902ms"),
        ("KMESHD_DURATION_NS", "2733902"),
        ("KMESHD_SRTT_US", "412"),
        ("KMESHD_MIN_RTT_US", "97"),
        ("KMESHD_RETRANSMITS", "0"),
        ("KMESHD_SEGS_IN", "6"),
        ("KMESHD_SEGS_OUT", "5"),
    ]
    assert MESSAGE_ID == "2fbe419c00fb412cafa2600c22093fd2"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        pytest.param(
            IPV6,
            "src.addr=[fd00::17]:51842, src.workload=prometheus-5fb7f6f8d8-h9cts, "
            "src.namespace=istio-system, dst.addr=[fd00::11]:80, "
            "dst.service=httpbin.default.svc.cluster.local, dst.workload=httpbin-5c5944c58c-v9mlk, "
            "dst.namespace=default, direction=INBOUND, sent_bytes=5, received_bytes=292, "
            "duration=850µs",
            id="ipv6",
        ),
        pytest.param(
            FAILED,
            "src.addr=10.244.0.17:51842, src.workload=prometheus-5fb7f6f8d8-h9cts, "
            "src.namespace=istio-system, dst.addr=10.244.0.13:9081, "
            "dst.service=productpage.echo-1-27855.svc.cluster.local, "
            "dst.workload=productpage-v1-8499c849b9-bz9t9, dst.namespace=echo-1-27855, "
            "direction=OUTBOUND, sent_bytes=0, received_bytes=0, duration=1.000512s, "
            "failure_reason=refused",
            id="failed",
        ),
        pytest.param(
            UNKNOWN,
            "src.addr=10.244.0.17:51842, src.workload=-, src.namespace=-, "
            "dst.addr=10.244.0.13:9080, dst.service=-, dst.workload=-, dst.namespace=-, "
            "direction=INBOUND, sent_bytes=0, received_bytes=0, duration=0s",
            id="unknowns-and-zeros",
        ),
    ],
)
def test_message_table(record: AccessRecord, expected: str) -> None:
    """IPv6, failed and unknown/zero records render the seed's text exactly."""
    assert message(record) == expected


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        pytest.param(
            IPV6,
            {
                "src.addr": "[fd00::17]:51842",
                "dst.addr": "[fd00::11]:80",
                "duration": "850µs",
                "duration_ns": 850_000,
            },
            id="ipv6",
        ),
        pytest.param(
            FAILED,
            {
                "direction": "OUTBOUND",
                "sent_bytes": 0,
                "received_bytes": 0,
                "duration": "1.000512s",
                "failure_reason": "refused",
            },
            id="failed",
        ),
        pytest.param(
            UNKNOWN,
            {
                "src.workload": "-",
                "dst.service": "-",
                "dst.workload": "-",
                "sent_bytes": 0,
                "received_bytes": 0,
                "duration": "0s",
                "duration_ns": 0,
            },
            id="unknowns-and-zeros",
        ),
        pytest.param(
            LARGE,
            {"sent_bytes": 5_000_000_001, "received_bytes": 18_446_744_073_709_551_615},
            id="beyond-32-bits",
        ),
    ],
)
def test_fields_table(record: AccessRecord, expected: dict[str, object]) -> None:
    """IPv6, failed and unknown/zero records carry these JSON values."""
    rendered = fields(record)
    assert {key: rendered[key] for key in expected} == expected


def test_byte_counts_beyond_32_bits_in_message_and_journal() -> None:
    """64-bit byte counts reach the text line and the journal fields digit for digit."""
    assert "sent_bytes=5000000001, received_bytes=18446744073709551615," in message(LARGE)
    journal = journal_fields(LARGE)
    assert (journal["KMESHD_SENT_BYTES"], journal["KMESHD_RECEIVED_BYTES"]) == (
        "5000000001",
        "18446744073709551615",
    )


def test_failure_reason_is_the_last_key_and_only_when_failed() -> None:
    """failure_reason closes the JSON object of a failed connect and is absent otherwise."""
    assert list(fields(FAILED))[-1] == "failure_reason"
    assert "failure_reason" not in fields(SEED)
    assert journal_fields(FAILED)["KMESHD_FAILURE_REASON"] == "refused"
    assert "KMESHD_FAILURE_REASON" not in journal_fields(SEED)


def test_failed_text_line() -> None:
    """A failed connect's text line ends with its failure reason."""
    assert text_line(FAILED.time_ns, message(FAILED)).endswith(
        "duration=1.000512s, failure_reason=refused"
    )


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("src.addr", "KMESHD_SRC_ADDR"),
        ("dst.workload", "KMESHD_DST_WORKLOAD"),
        ("duration", "KMESHD_DURATION"),
        ("duration_ns", "KMESHD_DURATION_NS"),
        ("failure_reason", "KMESHD_FAILURE_REASON"),
        ("time", "KMESHD_TIME"),
    ],
)
def test_journal_key(key: str, field: str) -> None:
    """JSON keys become journal fields upper-cased, "." -> "_", prefixed KMESHD_."""
    assert journal_key(key) == field


# Go's own table (src/time/time_test.go durationTests), then the shapes the access log shows.
GO_DURATIONS = [
    ("0s", 0),
    ("1ns", 1),
    ("1.1µs", 1_100),
    ("2.2ms", 2_200_000),
    ("3.3s", 3_300_000_000),
    ("4m5s", (4 * 60 + 5) * 10**9),
    ("4m5.001s", 4 * 60 * 10**9 + 5_001_000_000),
    ("5h6m7.001s", (5 * 3600 + 6 * 60) * 10**9 + 7_001_000_000),
    ("8m0.000000001s", 8 * 60 * 10**9 + 1),
    ("2562047h47m16.854775807s", (1 << 63) - 1),
    ("-2562047h47m16.854775808s", -(1 << 63)),
    ("999ns", 999),
    ("1µs", 1_000),
    ("1.5µs", 1_500),
    ("850µs", 850_000),
    ("999.999µs", 999_999),
    ("1ms", 1_000_000),
    ("2.733902ms", 2_733_902),
    ("999.999999ms", 999_999_999),
    ("1s", 10**9),
    ("1.5s", 1_500_000_000),
    ("1m0s", 60 * 10**9),
    ("1m2.5s", 62_500_000_000),
    ("1h0m0s", 3600 * 10**9),
    ("-1.5µs", -1_500),
]


@pytest.mark.parametrize(("text", "ns"), GO_DURATIONS)
def test_go_duration(text: str, ns: int) -> None:
    """go_duration(ns) is what Go's time.Duration(ns).String() prints."""
    assert go_duration(ns) == text


def test_go_duration_uses_the_micro_sign() -> None:
    """Microseconds use U+00B5 MICRO SIGN, as Go does, not U+03BC GREEK SMALL LETTER MU."""
    assert go_duration(850_000) == "850\u00b5s"


@pytest.mark.parametrize(
    ("ns", "rfc", "go"),
    [
        (
            1726301966552709932,
            "2024-09-14T08:19:26.552709932Z",
            "2024-09-14 08:19:26.552709932 +0000 UTC",
        ),
        (
            1726301966500000000,
            "2024-09-14T08:19:26.500000000Z",
            "2024-09-14 08:19:26.5 +0000 UTC",
        ),
        (1726301966000000000, "2024-09-14T08:19:26.000000000Z", "2024-09-14 08:19:26 +0000 UTC"),
        (0, "1970-01-01T00:00:00.000000000Z", "1970-01-01 00:00:00 +0000 UTC"),
    ],
)
def test_times(ns: int, rfc: str, go: str) -> None:
    """JSON time keeps 9 digits; the text line trims zeros like Go's Time.String()."""
    assert (rfc3339(ns), go_time(ns)) == (rfc, go)


def test_json_keys_name_every_field_in_order() -> None:
    """JSON_KEYS (what journal fields and `kmeshd accesslog` read back) is fields()'s order."""
    assert tuple(fields(FAILED)) == JSON_KEYS[:-1]  # no report: it is not periodic
    assert tuple(fields(SEED)) == JSON_KEYS[:-2]  # a normal close has neither
    periodic = replace(SEED, periodic=True)
    assert tuple(fields(periodic)) == (*JSON_KEYS[:-2], "report")


def test_a_periodic_record_says_so_last() -> None:
    """The record of an open connection ends its JSON object, its text line and its journal
    fields with report=periodic; the rest reads as a close's would."""
    periodic = replace(SEED, periodic=True)
    assert fields(periodic)["report"] == "periodic"
    assert message(periodic) == message(SEED) + ", report=periodic"
    assert journal_fields(periodic)["KMESHD_REPORT"] == "periodic"
    assert "KMESHD_REPORT" not in journal_fields(SEED)
