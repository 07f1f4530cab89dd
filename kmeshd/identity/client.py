"""HTTP to the apiserver and the kubelet: one GET, every way it can fail turned into an
`ApiError` whose message says what went wrong and what fixes it.

Both sources retry on any ApiError (with backoff), so the daemon never dies of a bad
response; the message is what the operator reads in the journal and in STATUS=.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Mapping
from typing import Any

import requests  # type: ignore[import-untyped,unused-ignore]

from kmeshd.identity.credentials import Credentials, session

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


class ApiError(Exception):
    """A request that did not give a usable answer."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds the server asked us to wait (429)


class Expired(ApiError):
    """410 Gone: the resourceVersion (or continue token) is too old; list again."""


def _retry_after(resp: requests.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _status_message(resp: requests.Response) -> str:
    """The `message` of a Kubernetes Status body, else the start of the body."""
    try:
        body = resp.json()
        if isinstance(body, Mapping) and isinstance(body.get("message"), str):
            return str(body["message"])
    except ValueError:
        pass
    return resp.text[:200].strip()


def _http_error(resp: requests.Response, what: str) -> ApiError:
    status = f"{what}: HTTP {resp.status_code}"
    detail = _status_message(resp)
    if resp.status_code == 401:
        return ApiError(f"{status} Unauthorized: the token or client certificate was refused")
    if resp.status_code == 403:
        return ApiError(
            f"{status} Forbidden ({detail}): grant list and watch on pods, services and "
            "discovery.k8s.io endpointslices, and get on nodes/pods for the kubelet"
        )
    if resp.status_code == 410:
        return Expired(f"{status} Gone ({detail})")
    return ApiError(f"{status} ({detail})" if detail else status, _retry_after(resp))


def _plain(exc: Exception) -> str:
    """The exception's text without object addresses: the same failure reads the same
    every time, so that it is logged once, not at every retry."""
    return re.sub(r" object at 0x[0-9a-f]+", "", str(exc))


def _transport_error(exc: requests.RequestException, what: str) -> ApiError:
    if isinstance(exc, requests.exceptions.SSLError):
        return ApiError(
            f"{what}: TLS failed ({_plain(exc)}): is the CA in the kubeconfig (or "
            "kubernetes.kubelet_ca_file) the one that signed the server's certificate?"
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return ApiError(f"{what}: cannot connect ({_plain(exc)})")
    if isinstance(exc, requests.exceptions.Timeout):
        return ApiError(f"{what}: timed out ({_plain(exc)})")
    return ApiError(f"{what}: {_plain(exc)}")


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
        """A 200 response, else ApiError. A 401 makes the token be re-read next time."""
        url = self.base + path
        try:
            resp = self.session.get(
                url,
                params=params,
                headers={"Accept": "application/json"},
                stream=stream,
                timeout=(CONNECT_TIMEOUT_S, read_timeout),
            )
        except requests.RequestException as exc:
            raise _transport_error(exc, f"GET {url}") from None
        if resp.status_code != 200:
            if resp.status_code == 401 and self.creds.token is not None:
                self.creds.token.invalidate()
            error = _http_error(resp, f"GET {url}")
            resp.close()
            raise error
        return resp

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        resp = self.get(path, params)
        try:
            return json.loads(resp.content)
        except requests.RequestException as exc:  # the body broke off
            raise _transport_error(exc, f"GET {resp.url}") from None
        except ValueError as exc:
            raise ApiError(f"GET {resp.url}: the body is not JSON ({exc})") from None

    def close(self) -> None:
        self.session.close()


def json_lines(resp: requests.Response) -> Generator[Any, None, None]:
    """The objects of a watch stream, one per line; ApiError when a line is not JSON or
    the stream breaks off."""
    try:
        for line in resp.iter_lines(chunk_size=65536):
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise ApiError(f"watch {resp.url}: an event is not JSON ({exc})") from None
    except requests.RequestException as exc:
        raise _transport_error(exc, f"watch {resp.url}") from None
    finally:
        resp.close()
