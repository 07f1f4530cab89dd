"""HTTP to the apiserver and the kubelet: one GET, every way it can fail turned into an
`ApiError` whose message says what went wrong and what fixes it.

Both sources retry on any ApiError (with backoff), so the daemon never dies of a bad
response; the message is what the operator reads in the journal and in STATUS=.

The servers are not trusted: a body is read up to a size limit (a list page, a watch
line), JSON that cannot be decoded (nested past Python's recursion limit, numbers past
its digit limit, bytes that are not UTF-8) is an ApiError like any other, and a
Retry-After is kept within RETRY_AFTER_S.
"""

from __future__ import annotations

import datetime
import email.utils
import http.client
import json
import re
import time
from collections.abc import Generator, Iterator, Mapping
from typing import Any

import requests  # type: ignore[import-untyped,unused-ignore]

from kmeshd.identity.credentials import Credentials, session

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
MAX_BODY_BYTES = 64 << 20  # one list page or kubelet pod list, decoded
MAX_LINE_BYTES = 16 << 20  # one watch event (etcd keeps objects up to 1.5 MiB)
MAX_ERROR_BYTES = 64 << 10  # what is read of an error's body for its message
RETRY_AFTER_S = (1.0, 300.0)  # a server's Retry-After, kept within this range
_MESSAGE_CHARS = 500  # an error message quotes at most this much of what a server said
_CHUNK = 65536
# What the request machinery raises besides RequestException: a header value it cannot
# send (UnicodeEncodeError, ValueError), an answer http.client cannot parse.
_CLIENT_ERRORS = (requests.RequestException, http.client.HTTPException, OSError, ValueError)
NOT_USABLE = "the apiserver's answer is not JSON we can use"


def printable(text: str) -> str:
    """`text` as a log line and STATUS= can carry it: one line, valid UTF-8 (a lone
    surrogate from a server's JSON becomes its escape), at most _MESSAGE_CHARS."""
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS] + "..."
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


class ApiError(Exception):
    """A request that did not give a usable answer."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(printable(message))
        self.retry_after = retry_after  # seconds the server asked us to wait (429)


class Expired(ApiError):
    """410 Gone: the resourceVersion (or continue token) is too old; list again."""


class Refused(ApiError):
    """The server answered, and refused the request as asked (a 4xx other than 401, 403,
    410 and 429; a watch's ERROR event): asking the same again will fail the same way."""


def retry_after(value: str | None, now: datetime.datetime) -> float | None:
    """Seconds a Retry-After header asks for (a number of seconds, or an HTTP date), kept
    within RETRY_AFTER_S: a server asking for 0 must not get a request loop, nor one
    asking for 10^400 a thread that waits forever (or fails to). None: no usable value."""
    if not value:
        return None
    value = value.strip()
    seconds = float(value) if re.fullmatch(r"\d+(\.\d+)?", value) else None
    if seconds is None:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, RETRY_AFTER_S[0]), RETRY_AFTER_S[1])


def _retry_after(resp: requests.Response) -> float | None:
    return retry_after(resp.headers.get("Retry-After"), datetime.datetime.now(datetime.UTC))


def _status_message(body: bytes) -> str:
    """The `message` of a Kubernetes Status body, else the start of the body."""
    try:
        status = json.loads(body)
        if isinstance(status, dict) and isinstance(status.get("message"), str):
            return str(status["message"])
    except (ValueError, RecursionError):
        pass
    return body[:200].decode("utf-8", "replace").strip()


def _http_error(resp: requests.Response, body: bytes, what: str) -> ApiError:
    status = f"{what}: HTTP {resp.status_code}"
    detail = _status_message(body)
    if resp.status_code == 401:
        return ApiError(f"{status} Unauthorized: the token or client certificate was refused")
    if resp.status_code == 403:
        return ApiError(
            f"{status} Forbidden ({detail}): grant list and watch on pods, services and "
            "discovery.k8s.io endpointslices, and get on nodes/pods for the kubelet"
        )
    if resp.status_code == 410:
        return Expired(f"{status} Gone ({detail})")
    if 400 <= resp.status_code < 500 and resp.status_code != 429:
        return Refused(f"{status} ({detail})" if detail else status)
    return ApiError(f"{status} ({detail})" if detail else status, _retry_after(resp))


def _plain(exc: Exception) -> str:
    """The exception's text without object addresses: the same failure reads the same
    every time, so that it is logged once, not at every retry."""
    return re.sub(r" object at 0x[0-9a-f]+", "", str(exc))


def _transport_error(exc: Exception, what: str) -> ApiError:
    if isinstance(exc, requests.exceptions.SSLError):
        return ApiError(
            f"{what}: TLS failed ({_plain(exc)}): is the CA in the kubeconfig (or "
            "kubernetes.kubelet_ca_file) the one that signed the server's certificate?"
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return ApiError(f"{what}: cannot connect ({_plain(exc)})")
    if isinstance(exc, requests.exceptions.Timeout):
        return ApiError(f"{what}: timed out ({_plain(exc)})")
    if isinstance(exc, requests.RequestException):
        return ApiError(f"{what}: {_plain(exc)}")
    return ApiError(f"{what}: the request failed ({type(exc).__name__}: {_plain(exc)})")


def _token_problem(token: str) -> str | None:
    """Why a bearer token cannot go in an Authorization header, or None. RFC 6750 tokens
    are visible ASCII; a newline or a non-ASCII character in the token file would
    otherwise fail every request deep inside http.client."""
    if re.fullmatch(r"[\x21-\x7e]+", token):
        return None
    bad = next((c for c in token if not 0x21 <= ord(c) <= 0x7E), "")
    return (
        f"the bearer token holds {bad!a}, which an HTTP header cannot carry: write the"
        " token alone, without spaces, newlines inside or non-ASCII characters"
    )


def read_limited(chunks: Iterator[bytes], limit: int, what: str) -> bytes:
    """The chunks joined, or ApiError once they pass `limit` bytes."""
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ApiError(
                f"{what}: {NOT_USABLE}: the body is larger than {limit >> 20} MiB (the limit)"
            )
        parts.append(chunk)
    return b"".join(parts)


def decode(data: bytes, what: str) -> Any:
    """JSON from a server; ApiError for anything json cannot turn into Python values:
    bad syntax, bytes that are not UTF-8, nesting past the recursion limit, integers
    past the digit limit."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        kind = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ApiError(f"{what}: {NOT_USABLE} ({kind})") from None


class Client:
    """GETs against one server with one set of credentials."""

    def __init__(self, creds: Credentials, base_url: str | None = None) -> None:
        self.creds = creds
        self.base = (base_url or creds.server).rstrip("/")
        self.session = session(creds)

    def get(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> requests.Response:
        """A 200 response, its body not read yet (`stream` is kept for the callers' sake:
        every body is streamed, so that none is read past its limit); else ApiError. A 401
        makes the token be re-read next time."""
        url = self.base + path
        if self.creds.token is not None:
            problem = _token_problem(self.creds.token.current(time.monotonic()))
            if problem is not None:
                raise ApiError(f"GET {url}: {problem}")
        try:
            resp = self.session.get(
                url,
                params=params,
                headers={"Accept": "application/json"},
                stream=True,
                timeout=(CONNECT_TIMEOUT_S, read_timeout),
            )
        except _CLIENT_ERRORS as exc:
            raise _transport_error(exc, f"GET {url}") from None
        if resp.status_code != 200:
            if resp.status_code == 401 and self.creds.token is not None:
                self.creds.token.invalidate()
            try:
                body = next(resp.iter_content(MAX_ERROR_BYTES), b"")
            except _CLIENT_ERRORS:
                body = b""
            error = _http_error(resp, body, f"GET {url}")
            resp.close()
            raise error
        return resp

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        resp = self.get(path, params)
        what = f"GET {self.base + path}"
        try:
            data = read_limited(resp.iter_content(_CHUNK), MAX_BODY_BYTES, what)
        except _CLIENT_ERRORS as exc:  # the body broke off
            raise _transport_error(exc, what) from None
        finally:
            resp.close()
        return decode(data, what)

    def close(self) -> None:
        self.session.close()


def lines(chunks: Iterator[bytes], limit: int, what: str) -> Iterator[bytes]:
    """The non-empty lines of a stream, each at most `limit` bytes (else ApiError: a line
    that never ends must not take all memory); a last line without its newline too. The
    pieces of a line are joined once it is whole, not at every chunk."""
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            size += end - start
            if size > limit:
                break
            line = b"".join(parts) + chunk[start:end]
            parts, size, start = [], 0, end + 1
            if line.strip():
                yield line
        parts.append(chunk[start:])
        size += len(chunk) - start
        if size > limit:
            raise ApiError(f"{what}: {NOT_USABLE}: an event is larger than {limit >> 20} MiB")
    if parts and (line := b"".join(parts)).strip():
        yield line


def json_lines(resp: requests.Response) -> Generator[Any, None, None]:
    """The objects of a watch stream, one per line; ApiError when a line is not JSON we can
    use, is too long, or the stream breaks off."""
    what = f"watch {resp.url}"
    try:
        for line in lines(resp.iter_content(_CHUNK), MAX_LINE_BYTES, what):
            yield decode(line, what)
    except _CLIENT_ERRORS as exc:
        raise _transport_error(exc, what) from None
    finally:
        resp.close()
