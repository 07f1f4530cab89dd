"""Credentials for the Kubernetes apiserver and the kubelet, and what uses them.

    Credentials       where a server is, whom to trust, who we are (kubeconfig.py finds
                      the apiserver's; kubelet_credentials derives the kubelet's)
    TokenSource       a bearer token, re-read as its file rotates
    session()         a requests session that verifies and authenticates as they say
    write_embedded()  a kubeconfig's embedded certificates, written where they are expected

Token files are re-read (every minute by default, and at once after a 401), because
bound service-account tokens are rotated by the kubelet, hourly and well before they
expire: a daemon that read its token once would lose the apiserver after a while.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests  # type: ignore[import-untyped,unused-ignore]

from kmeshd.errors import ConfigError, UnavailableError
from kmeshd.files import CREDENTIAL_LIMIT, NotRegularError, read_regular, write_atomic
from kmeshd.validate import quote

log = logging.getLogger(__name__)

TOKEN_PERIOD = 60.0  # seconds between re-reads of a token file


class TokenSource:
    """A bearer token: static, or read from a file and re-read as the file rotates.

    Thread-safe: the apiserver watches and the kubelet poller share one.
    """

    def __init__(self, token: str, file: Path | None = None, period: float = TOKEN_PERIOD) -> None:
        self.file = file
        self.period = period
        self._token = token
        self._read_at: float | None = None  # None: fresh, the first current() starts the clock
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, file: Path, period: float = TOKEN_PERIOD) -> TokenSource:
        """A source that starts with the file's token; ValueError (the problem) if unusable."""
        return cls(_read_token(file), file, period)

    def current(self, now: float) -> str:
        """The token to send at monotonic time `now`, re-reading the file when due."""
        with self._lock:
            if self.file is None:
                return self._token
            if self._read_at is not None and now - self._read_at >= self.period:
                self._reread()
            if self._read_at is None:
                self._read_at = now
            return self._token

    def invalidate(self) -> None:
        """Re-read the file on the next current(): the apiserver refused the token (401)."""
        with self._lock:
            self._read_at = -float("inf")

    def _reread(self) -> None:
        assert self.file is not None
        try:
            self._token = _read_token(self.file)
        except ValueError as e:
            # The old token may well still be valid (they outlive their rotation); the
            # next try is a period later, so this warns at most once a period.
            log.warning("keeping the last token: %s", e)
        self._read_at = None

    def __repr__(self) -> str:  # never the token itself: Credentials get logged
        return f"TokenSource(file={str(self.file)!r})" if self.file else "TokenSource(static)"


def _read_token(file: Path) -> str:
    data = read_file(file)
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{quote(str(file))} is not UTF-8 text") from e
    if not token:
        raise ValueError(f"{quote(str(file))} is empty")
    if (problem := token_problem(token)) is not None:
        raise ValueError(f"{quote(str(file))}: {problem}")
    return token


def token_problem(token: str) -> str | None:
    """Why `token` cannot follow "Authorization: Bearer " in an HTTP header, or None:
    requests refuses a line break, and headers are latin-1; a token is one line of ASCII.
    A control character or a non-ASCII one is named by its code point, never shown."""
    for i, c in enumerate(token):
        if not " " <= c <= "~":
            what = "a line break" if c in "\r\n" else f"U+{ord(c):04X}"
            return (
                f"the token has {what} at character {i + 1}, which no HTTP header can carry"
                " (a token is one line of ASCII text)"
            )
    return None


def read_file(path: Path) -> bytes:
    """A credential file's content; ValueError naming the file and the problem."""
    try:
        return read_regular(path, CREDENTIAL_LIMIT)
    except OSError as e:
        raise ValueError(f"cannot read {quote(str(path))}: {e.strerror or e}") from e
    except NotRegularError as e:
        raise ValueError(f"{quote(str(path))} {e}") from e


@dataclass(frozen=True)
class Credentials:
    """How to reach one endpoint: where, whom to trust, who we are."""

    server: str  # URL without a trailing slash
    ca_file: Path | None = None  # None: the system's CAs
    insecure: bool = False  # skip verifying the server's certificate
    token: TokenSource | None = None
    client_cert: tuple[Path, Path] | None = None  # (certificate, key)
    origin: str = ""  # where these came from, for log lines
    # A kubeconfig's embedded certificates: (the path the fields above name, content),
    # written by write_embedded() before first use.
    embedded: tuple[tuple[Path, bytes], ...] = ()


def kubelet_credentials(
    api: Credentials, kubelet_url: str, token_file: str, ca_file: str
) -> Credentials | None:
    """The kubelet's credentials from the `[kubernetes]` keys; None if kubelet_url is ""."""
    if not kubelet_url:
        return None
    url = kubelet_url.rstrip("/")
    if urlsplit(url).scheme == "http":
        # The read-only port takes no credentials; a token would travel in clear text.
        return Credentials(url, origin="kubelet read-only port")
    problems = []
    token, cert = api.token, api.client_cert
    if token_file:
        cert = None  # the operator chose a token: it is the only identity presented
        try:
            token = TokenSource.from_file(Path(token_file))
        except ValueError as e:
            problems.append(f"kubernetes.kubelet_token_file: {e}")
    ca = api.ca_file
    if ca_file:
        ca = Path(ca_file)
        if (problem := unreadable(ca)) is not None:
            problems.append(f"kubernetes.kubelet_ca_file: {problem}")
    if problems:
        raise ConfigError(problems)
    insecure = api.insecure and not ca_file  # the apiserver's trust only where its CA is used
    return Credentials(url, ca, insecure, token, cert, f"kubelet, {api.origin}")


def session(creds: Credentials) -> requests.Session:
    """A requests session that verifies, authenticates and re-reads tokens as `creds` say.

    trust_env is off: $REQUESTS_CA_BUNDLE would otherwise override the cluster's CA, and
    proxy variables meant for the host's other traffic would apply to the cluster's.
    """
    s = requests.Session()
    s.trust_env = False
    s.verify = False if creds.insecure else str(creds.ca_file) if creds.ca_file else True
    if creds.client_cert is not None:
        cert, key = creds.client_cert
        s.cert = (str(cert), str(key))
    if creds.token is not None:
        token = creds.token

        def bearer(request: Any) -> Any:
            request.headers["Authorization"] = f"Bearer {token.current(time.monotonic())}"
            return request

        s.auth = bearer
    return s


def unreadable(path: Path) -> str | None:
    """Why `path` cannot be read, or None: checked up front, so the error names the key."""
    try:
        read_file(path)
    except ValueError as e:
        return str(e)
    return None


def write_embedded(creds: Credentials) -> None:
    """Write the embedded certificates to the paths `creds` names, private to this user
    (they include a private key); UnavailableError when that is not possible."""
    if not creds.embedded:
        return
    directory = creds.embedded[0][0].parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is masked by umask, or it existed
        for path, data in creds.embedded:
            write_atomic(path, data, 0o600)
    except OSError as e:
        raise UnavailableError(
            f"cannot write the kubeconfig's embedded certificates to {directory}:"
            f" {e.strerror or e} (run as root, or use file paths in the kubeconfig)"
        ) from e
