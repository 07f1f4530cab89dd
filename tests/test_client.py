"""kmeshd.identity.client: failures become messages that name the problem and the fix."""

from __future__ import annotations

import datetime

import pytest
import requests  # type: ignore[import-untyped,unused-ignore]

from kmeshd.identity.client import (
    ApiError,
    Client,
    _transport_error,
    decode,
    lines,
    read_limited,
    retry_after,
)
from kmeshd.identity.credentials import Credentials, TokenSource
from tests.tls import TlsFiles


def test_the_same_failure_reads_the_same_every_time() -> None:
    """Object addresses are cut from transport errors, so a failing source's log line
    (written when the message changes) is not repeated at every retry."""
    exc = requests.exceptions.ConnectionError(
        "HTTPSConnectionPool(host='127.0.0.1', port=6443): Max retries exceeded (Caused by "
        "NewConnectionError('<urllib3.connection.HTTPSConnection object at 0x7f3a2c1d9e50>: "
        "Failed to establish a new connection: [Errno 111] Connection refused'))"
    )
    error = _transport_error(exc, "GET https://127.0.0.1:6443/api/v1/pods")
    assert str(error) == (
        "GET https://127.0.0.1:6443/api/v1/pods: cannot connect (HTTPSConnectionPool("
        "host='127.0.0.1', port=6443): Max retries exceeded (Caused by NewConnectionError("
        "'<urllib3.connection.HTTPSConnection>: Failed to establish a new connection: "
        "[Errno 111] Connection refused')))"
    )


def test_a_certificate_problem_points_at_the_ca() -> None:
    error = _transport_error(requests.exceptions.SSLError("certificate verify failed"), "GET x")
    assert str(error) == (
        "GET x: TLS failed (certificate verify failed): is the CA in the kubeconfig (or "
        "kubernetes.kubelet_ca_file) the one that signed the server's certificate?"
    )


NOW = datetime.datetime(2026, 12, 1, 10, 0, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        ("0", 1.0),  # a server asking for none gets a second, not a request loop
        ("0.2", 1.0),
        ("120", 120.0),
        ("86400", 300.0),
        ("1" * 400, 300.0),  # 10^400: once an OverflowError that killed the watcher
        ("Tue, 01 Dec 2026 10:00:30 GMT", 30.0),
        ("Tue, 01 Dec 2026 09:00:00 GMT", 1.0),  # in the past
        ("Fri, 01 Dec 2028 10:00:00 GMT", 300.0),
        ("-5", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_kept_within_its_range(value: str | None, seconds: float | None) -> None:
    assert retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b'{"a":1}\n{"b":2}\n'], [b'{"a":1}', b'{"b":2}']),
        ([b'{"a"', b":1}\n", b"\n", b'{"b":2}'], [b'{"a":1}', b'{"b":2}']),  # last unended
        ([b"x" * 10 + b"\n"], [b"x" * 10]),  # exactly the limit
        ([b"\n\n  \n"], []),
    ],
)
def test_lines_of_a_stream(chunks: list[bytes], expected: list[bytes]) -> None:
    assert list(lines(iter(chunks), 10, "watch x")) == expected


@pytest.mark.parametrize(
    "chunks",
    [
        [b"x" * 11 + b"\n"],
        [b"x" * 6, b"x" * 5],  # a line that never ends, chunk by chunk
        [b"ok\n" + b"x" * 11],
        [b"x" * 6, b"x" * 5 + b"\n"],
    ],
)
def test_a_line_past_the_limit_is_an_error(chunks: list[bytes]) -> None:
    with pytest.raises(ApiError) as err:
        list(lines(iter(chunks), 10, "watch x"))
    assert str(err.value) == (
        "watch x: the apiserver's answer is not JSON we can use: an event is larger than 0 MiB"
    )


def test_a_body_past_the_limit_is_an_error() -> None:
    assert read_limited(iter([b"ab", b"cd"]), 4, "GET x") == b"abcd"
    with pytest.raises(ApiError) as err:
        read_limited(iter([b"ab", b"cd", b"e"]), 4, "GET x")
    assert str(err.value) == (
        "GET x: the apiserver's answer is not JSON we can use: the body is larger than 0 MiB"
        " (the limit)"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b"[" * 100_000,
            "GET x: the apiserver's answer is not JSON we can use (nested too deeply)",
        ),
        (
            b'{"a":' * 5000 + b"1" + b"}" * 5000,
            "GET x: the apiserver's answer is not JSON we can use (nested too deeply)",
        ),
        (b"\xff", "GET x: the apiserver's answer is not JSON we can use ("),
        (b"1" * 5000, "GET x: the apiserver's answer is not JSON we can use (Exceeds the limit"),
        (b"<html>", "GET x: the apiserver's answer is not JSON we can use (Expecting value"),
    ],
)
def test_json_that_cannot_be_used_is_an_api_error(data: bytes, message: str) -> None:
    with pytest.raises(ApiError) as err:
        decode(data, "GET x")
    assert str(err.value).startswith(message)


def test_a_lone_surrogate_in_json_decodes_and_is_left_to_validation() -> None:
    assert decode(b'"\\ud800"', "GET x") == "\ud800"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("two\nlines\r\x00", "two lines  "),
        ("bad \ud800 json", "bad \\ud800 json"),
        ("x" * 600, "x" * 500 + "..."),
    ],
)
def test_error_messages_are_one_printable_line(text: str, expected: str) -> None:
    """What a server says reaches the journal and STATUS=: one line, valid UTF-8."""
    assert str(ApiError(text)) == expected


@pytest.mark.parametrize(
    ("token", "bad"),
    [("abc\n", "'\\n'"), ("abc def", "' '"), ("jeton-\xe9", "'\\xe9'"), ("\u2603", "'\\u2603'")],
)
def test_a_token_an_http_header_cannot_carry_is_an_api_error(
    tls_files: TlsFiles, token: str, bad: str
) -> None:
    """Not sent at all: an ApiError naming the character, where http.client would raise
    ValueError or UnicodeEncodeError out of the source's thread."""
    client = Client(Credentials("https://127.0.0.1:1", tls_files.ca_cert, token=TokenSource(token)))
    with pytest.raises(ApiError) as err:
        client.get("/api/v1/pods")
    assert str(err.value) == (
        f"GET https://127.0.0.1:1/api/v1/pods: the bearer token holds {bad}, which an HTTP"
        " header cannot carry: write the token alone, without spaces, newlines inside or"
        " non-ASCII characters"
    )
