"""Credentials for the Kubernetes apiserver and the kubelet (INTERFACE.md, `[kubernetes]`).

Where the apiserver's credentials come from, first match wins:

1. `kubernetes.kubeconfig`, when set: that file, which must exist.
2. `$KUBECONFIG`: its first path. kubectl merges every file of a colon-separated list;
   kmeshd reads only the first, which is enough for the one cluster a node belongs to.
3. `/etc/kmeshd/kubeconfig`, if it exists.
4. The in-cluster service account, when `KUBERNETES_SERVICE_HOST` and
   `KUBERNETES_SERVICE_PORT` are set: server `https://<host>:<port>`, the token and CA
   that Kubernetes mounts into every pod.

A kubeconfig is read as kubectl reads it: current-context -> context -> cluster and user,
relative paths relative to the kubeconfig's directory. Users with exec or auth-provider
plugins are refused: running arbitrary helper programs from a root daemon is not worth
it, and a token, a token file or a client certificate does the same job. Certificates
embedded as `*-data` are written to a private directory, because `requests` takes paths.

Token files are re-read (every minute by default, and at once after a 401), because
bound service-account tokens are rotated by the kubelet, hourly and well before they
expire: a daemon that read its token once would lose the apiserver after a while.

Every problem in a kubeconfig is reported at once, as `file: key.path: problem` lines.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests  # type: ignore[import-untyped,unused-ignore]
import yaml  # type: ignore[import-untyped,unused-ignore]

from kmeshd.errors import ConfigError, UnavailableError
from kmeshd.tomlcheck import Problems, quote, read_text

log = logging.getLogger("kmeshd")

DEFAULT_KUBECONFIG = Path("/etc/kmeshd/kubeconfig")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DATA_DIR = Path("/run/kmeshd/credentials")  # where embedded *-data certificates are written
TOKEN_PERIOD = 60.0  # seconds between re-reads of a token file
_UNSUPPORTED = "is not supported; use a token, tokenFile or client certificate"


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
    try:
        token = file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ValueError(f"cannot read {quote(str(file))}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{quote(str(file))} is not UTF-8 text") from e
    if not token:
        raise ValueError(f"{quote(str(file))} is empty")
    return token


@dataclass(frozen=True)
class Credentials:
    """How to reach one endpoint: where, whom to trust, who we are."""

    server: str  # URL without a trailing slash
    ca_file: Path | None = None  # None: the system's CAs
    insecure: bool = False  # skip verifying the server's certificate
    token: TokenSource | None = None
    client_cert: tuple[Path, Path] | None = None  # (certificate, key)
    origin: str = ""  # where these came from, for log lines


def resolve(
    cfg_kubeconfig: str,
    env: Mapping[str, str],
    default_kubeconfig: Path = DEFAULT_KUBECONFIG,
    sa_dir: Path = SERVICE_ACCOUNT_DIR,
    data_dir: Path = DATA_DIR,
) -> Credentials:
    """The apiserver's credentials, searched in the module docstring's order; ConfigError."""
    if cfg_kubeconfig:
        return load_kubeconfig(Path(cfg_kubeconfig), data_dir, "kubernetes.kubeconfig")
    first = next((p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p), None)
    if first:
        return load_kubeconfig(Path(first), data_dir, "$KUBECONFIG")
    text = read_text(default_kubeconfig, missing_ok=True)
    if text is not None:
        return parse_kubeconfig(text, default_kubeconfig, data_dir)
    creds = in_cluster(env, sa_dir)
    if creds is None:
        raise ConfigError(
            [
                "kubernetes.kubeconfig: no apiserver credentials: $KUBECONFIG is not set,"
                f" {default_kubeconfig} does not exist and this is not a pod"
                " (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set);"
                " set kubernetes.kubeconfig, or run in a pod with a service account"
            ]
        )
    return creds


def in_cluster(env: Mapping[str, str], sa_dir: Path = SERVICE_ACCOUNT_DIR) -> Credentials | None:
    """The pod's service account; None outside a pod; ConfigError if its files are unusable."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    problems = []
    if not (port.isascii() and port.isdigit()):
        problems.append(f"$KUBERNETES_SERVICE_PORT: {quote(port)} is not a port number")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address, as a URL writes it
    token = None
    try:
        token = TokenSource.from_file(sa_dir / "token")
    except ValueError as e:
        problems.append(f"in-cluster service account: {e}")
    ca_file = sa_dir / "ca.crt"
    if (problem := _unreadable(ca_file)) is not None:
        problems.append(f"in-cluster service account: {problem}")
    if problems:
        raise ConfigError(problems)
    origin = f"in-cluster service account {sa_dir}"
    return Credentials(f"https://{host}:{port}", ca_file, token=token, origin=origin)


def load_kubeconfig(path: Path, data_dir: Path = DATA_DIR, origin: str = "") -> Credentials:
    """The credentials of the kubeconfig's current context; `origin` names who chose the file."""
    try:
        text = read_text(path, missing_ok=False)
    except ConfigError as e:
        suffix = f" (named by {origin})" if origin else ""
        raise ConfigError([line + suffix for line in e.problems]) from e
    assert text is not None
    return parse_kubeconfig(text, path, data_dir)


def parse_kubeconfig(text: str, path: Path, data_dir: Path = DATA_DIR) -> Credentials:
    """The credentials `text` (the kubeconfig at `path`) describes; ConfigError, every problem."""
    path = path.absolute()  # relative paths inside are relative to its directory
    doc = _parse_yaml(text, path)
    problems = Problems(path)
    contexts = _named(doc, "context", problems)
    clusters = _named(doc, "cluster", problems)
    users = _named(doc, "user", problems)
    context = _current_context(doc, contexts, problems)
    if context is None:
        problems.raise_if_any()
    assert context is not None
    files = _Files(path.parent, data_dir)
    cluster = _pick(context, "cluster", clusters)
    user = _pick(context, "user", users)
    server, ca_file, insecure = _cluster(cluster, files) if cluster else ("", None, False)
    token, client_cert = _user(user, files) if user else (None, None)
    problems.raise_if_any()
    files.write()
    return Credentials(server, ca_file, insecure, token, client_cert, f"kubeconfig {path}")


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
        if (problem := _unreadable(ca)) is not None:
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


# --- the kubeconfig, piece by piece ---------------------------------------------------


def _parse_yaml(text: str, path: Path) -> Mapping[str, object]:
    try:
        doc: object = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise ConfigError([f"{path}: {where}{e.problem}"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: {e}"]) from e
    if not isinstance(doc, dict):
        what = "empty" if doc is None else f"{_kind(doc)}, not a mapping"
        raise ConfigError([f"{path}: not a kubeconfig: the file is {what}"])
    return doc


def _kind(value: object) -> str:
    """What a YAML value is, for "expected X, got Y" messages."""
    if isinstance(value, str):
        return f"the string {quote(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else f"the value {value!r}"


@dataclass
class _Entry:
    """One cluster/context/user body; getters record problems and return None."""

    key: str  # its path: "users[0].user"
    body: Mapping[str, object]
    problems: Problems

    def problem(self, name: str, problem: str) -> None:
        self.problems.add(f"{self.key}.{name}" if name else self.key, problem)

    def string(self, name: str) -> str | None:
        value = self.body.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            self.problem(name, f"expected a string, got {_kind(value)}")
            return None
        return value

    def flag(self, name: str) -> bool:
        value = self.body.get(name, False)
        if not isinstance(value, bool):
            self.problem(name, f"expected true or false, got {_kind(value)}")
            return False
        return value


def _named(doc: Mapping[str, object], kind: str, problems: Problems) -> dict[str, _Entry]:
    """name -> entry of the `kind`s list (first of a name wins); problems for bad shapes."""
    entries = doc.get(f"{kind}s") or []
    if not isinstance(entries, list):
        problems.add(f"{kind}s", f"expected a list, got {_kind(entries)}")
        return {}
    named: dict[str, _Entry] = {}
    for i, entry in enumerate(entries):
        key = f"{kind}s[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            problems.add(key, f"expected a mapping with a name, got {_kind(entry)}")
            continue
        body = entry.get(kind) or {}
        if not isinstance(body, dict):
            problems.add(f"{key}.{kind}", f"expected a mapping, got {_kind(body)}")
            continue
        named.setdefault(entry["name"], _Entry(f"{key}.{kind}", body, problems))
    return named


def _names(entries: Mapping[str, _Entry]) -> str:
    return ", ".join(entries) or "there are none"


def _current_context(
    doc: Mapping[str, object], contexts: dict[str, _Entry], problems: Problems
) -> _Entry | None:
    name = doc.get("current-context")
    if not isinstance(name, str) or not name:
        fix = "set it, e.g. with kubectl config use-context"
        problems.add("current-context", f"is not set ({fix}; contexts: {_names(contexts)})")
        return None
    if name not in contexts:
        problem = f"{quote(name)} is not one of the contexts ({_names(contexts)})"
        problems.add("current-context", problem)
        return None
    return contexts[name]


def _pick(context: _Entry, kind: str, entries: dict[str, _Entry]) -> _Entry | None:
    """The cluster or user the context names, or None with the problem recorded."""
    name = context.string(kind)
    if name is None:
        context.problem(kind, "is not set")
        return None
    if name not in entries:
        context.problem(kind, f"{quote(name)} is not one of the {kind}s ({_names(entries)})")
        return None
    return entries[name]


class _Files:
    """Paths of a kubeconfig's files, and the embedded ones still to be written."""

    def __init__(self, base: Path, data_dir: Path) -> None:
        self.base = base
        self.data_dir = data_dir
        self.pending: dict[str, bytes] = {}

    def path_or_data(self, entry: _Entry, name: str, filename: str) -> Path | None:
        """The file `name` names (relative to the kubeconfig) or `name`-data will be written to."""
        path, data = entry.string(name), entry.string(f"{name}-data")
        if path and data:
            entry.problem(name, f"{name} and {name}-data are both set; keep one")
            return None
        if data:
            return self._data(entry, f"{name}-data", data, filename)
        if path:
            resolved = self.base / path  # an absolute path stays as it is
            if (problem := _unreadable(resolved)) is not None:
                entry.problem(name, problem)
            return resolved
        return None

    def _data(self, entry: _Entry, name: str, data: str, filename: str) -> Path | None:
        try:
            # Go's base64 decoder, which kubectl uses, skips line breaks; so does this.
            decoded = base64.b64decode("".join(data.split()), validate=True)
        except binascii.Error:
            entry.problem(name, "is not valid base64")
            return None
        if b"-----BEGIN " not in decoded:
            entry.problem(name, 'is not base64 of a PEM file (no "-----BEGIN")')
            return None
        self.pending[filename] = decoded
        return self.data_dir / filename

    def write(self) -> None:
        """Write the embedded files, private to this user: they include a private key."""
        if not self.pending:
            return
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.data_dir, 0o700)  # mkdir's mode is masked by umask, or it existed
            for filename, data in self.pending.items():
                _write_private(self.data_dir / filename, data)
        except OSError as e:
            raise UnavailableError(
                f"cannot write the kubeconfig's embedded certificates to {self.data_dir}:"
                f" {e.strerror or e} (run as root, or use file paths in the kubeconfig)"
            ) from e


def _write_private(path: Path, data: bytes) -> None:
    # Written aside and renamed, so that a connection opening the file meanwhile (a
    # SIGHUP reload rewrites it) reads the old or the new one, never half of one.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be read, or None: checked up front, so the error names the key."""
    try:
        with path.open("rb"):
            return None
    except OSError as e:
        return f"cannot read {quote(str(path))}: {e.strerror or e}"


def _cluster(entry: _Entry, files: _Files) -> tuple[str, Path | None, bool]:
    server = entry.string("server")
    if server is None:
        if entry.body.get("server") in (None, ""):  # else string() reported its type
            entry.problem("server", "is not set")
    elif urlsplit(server).scheme not in ("http", "https") or not urlsplit(server).hostname:
        entry.problem("server", f"{quote(server)} is not an https:// URL")
    ca_file = files.path_or_data(entry, "certificate-authority", "ca.crt")
    insecure = entry.flag("insecure-skip-tls-verify")
    if insecure and ca_file is not None:
        entry.problem("insecure-skip-tls-verify", "cannot be true with a certificate-authority")
    return (server or "").rstrip("/"), ca_file, insecure


def _user(entry: _Entry, files: _Files) -> tuple[TokenSource | None, tuple[Path, Path] | None]:
    for name, what in (
        ("exec", "exec credential plugins"),
        ("auth-provider", "auth-provider plugins"),
        ("username", "basic authentication (username/password)"),
    ):
        if entry.body.get(name) is not None:
            entry.problem("", f"{what} {_UNSUPPORTED}")
    cert = files.path_or_data(entry, "client-certificate", "client.crt")
    key = files.path_or_data(entry, "client-key", "client.key")
    has_cert, has_key = _has(entry, "client-certificate"), _has(entry, "client-key")
    if has_cert and not has_key:
        entry.problem("client-key", "is not set, and a client certificate needs it")
    if has_key and not has_cert:
        entry.problem("client-certificate", "is not set, and a client key needs it")
    return _token(entry, files), (cert, key) if cert and key else None


def _has(entry: _Entry, name: str) -> bool:
    return bool(entry.body.get(name) or entry.body.get(f"{name}-data"))


def _token(entry: _Entry, files: _Files) -> TokenSource | None:
    token, token_file = entry.string("token"), entry.string("tokenFile")
    if token_file:
        # With both set, client-go re-reads the file after starting with the token;
        # the file is what rotates, so it wins here from the start.
        try:
            return TokenSource.from_file(files.base / token_file)
        except ValueError as e:
            entry.problem("tokenFile", str(e))
            return None
    return TokenSource(token) if token else None
