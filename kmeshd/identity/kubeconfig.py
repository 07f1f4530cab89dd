"""Where the apiserver's credentials come from, first match wins:

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
it, and a token, a token file or a client certificate does the same job.

Reading writes nothing. Certificates embedded as `*-data` come back in
`Credentials.embedded`, with the paths they are to have (`requests` takes paths); the
daemon writes them when it starts its sources (credentials.write_embedded), and `kmeshd
check-config` never does. Every problem in a kubeconfig is reported at once, as
`file: key.path: problem` lines.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path

from kmeshd.errors import ConfigError
from kmeshd.files import CREDENTIAL_LIMIT
from kmeshd.identity.credentials import Credentials, TokenSource, token_problem, unreadable
from kmeshd.validate import (
    Problems,
    Table,
    describe_yaml,
    quote,
    read_text,
    read_yaml,
    url_problem,
)

DEFAULT_KUBECONFIG = Path("/etc/kmeshd/kubeconfig")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DATA_DIR = Path("/run/kmeshd/credentials")  # where embedded *-data certificates go
_UNSUPPORTED = "is not supported; use a token, tokenFile or client certificate"


def apiserver_credentials(
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
    text = read_text(default_kubeconfig, missing_ok=True, limit=CREDENTIAL_LIMIT)
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
    if (problem := unreadable(ca_file)) is not None:
        problems.append(f"in-cluster service account: {problem}")
    if problems:
        raise ConfigError(problems)
    origin = f"in-cluster service account {sa_dir}"
    return Credentials(f"https://{host}:{port}", ca_file, token=token, origin=origin)


def load_kubeconfig(path: Path, data_dir: Path = DATA_DIR, origin: str = "") -> Credentials:
    """The credentials of the kubeconfig's current context; `origin` names who chose the file."""
    try:
        text = read_text(path, missing_ok=False, limit=CREDENTIAL_LIMIT)
    except ConfigError as e:
        suffix = f" (named by {origin})" if origin else ""
        raise ConfigError([line + suffix for line in e.problems]) from e
    assert text is not None
    return parse_kubeconfig(text, path, data_dir)


def parse_kubeconfig(text: str, path: Path, data_dir: Path = DATA_DIR) -> Credentials:
    """The credentials `text` (the kubeconfig at `path`) describes; ConfigError, every
    problem. Embedded certificates are to be written under `data_dir`."""
    path = path.absolute()  # relative paths inside are relative to its directory
    problems = Problems(path)
    doc = Table(_parse_yaml(text, path), "", problems, describe=describe_yaml)
    contexts = _named(doc, "context")
    clusters = _named(doc, "cluster")
    users = _named(doc, "user")
    context = _current_context(doc, contexts)
    if context is None:
        problems.raise_if_any()
    assert context is not None
    files = _Files(path.parent, data_dir)
    cluster = _pick(context, "cluster", clusters)
    user = _pick(context, "user", users)
    server, ca_file, insecure = _cluster(cluster, files) if cluster else ("", None, False)
    token, client_cert = _user(user, files) if user else (None, None)
    problems.raise_if_any()
    embedded = tuple((data_dir / name, data) for name, data in files.embedded.items())
    return Credentials(
        server, ca_file, insecure, token, client_cert, f"kubeconfig {path}", embedded
    )


def _parse_yaml(text: str, path: Path) -> Mapping[str, object]:
    doc = read_yaml(text, path)
    if not isinstance(doc, dict):
        what = "empty" if doc is None else f"{describe_yaml(doc)}, not a mapping"
        raise ConfigError([f"{path}: not a kubeconfig: the file is {what}"])
    return doc


def _named(doc: Table, kind: str) -> dict[str, Table]:
    """name -> body of each entry of the `kind`s list (first of a name wins); problems
    for bad shapes."""
    entries = doc.raw(f"{kind}s") or []
    if not isinstance(entries, list):
        doc.problem(f"{kind}s", f"expected a list, got {describe_yaml(entries)}")
        return {}
    named: dict[str, Table] = {}
    for i, entry in enumerate(entries):
        key = f"{kind}s[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            doc.problem(key, f"expected a mapping with a name, got {describe_yaml(entry)}")
            continue
        body = entry.get(kind) or {}
        if not isinstance(body, dict):
            doc.problem(f"{key}.{kind}", f"expected a mapping, got {describe_yaml(body)}")
            continue
        table = Table(body, f"{key}.{kind}", doc.problems, describe=describe_yaml)
        named.setdefault(entry["name"], table)
    return named


def _names(entries: Mapping[str, Table]) -> str:
    return ", ".join(entries) or "there are none"


def _current_context(doc: Table, contexts: dict[str, Table]) -> Table | None:
    name = doc.raw("current-context")
    if not isinstance(name, str) or not name:
        fix = "set it, e.g. with kubectl config use-context"
        doc.problem("current-context", f"is not set ({fix}; contexts: {_names(contexts)})")
        return None
    if name not in contexts:
        problem = f"{quote(name)} is not one of the contexts ({_names(contexts)})"
        doc.problem("current-context", problem)
        return None
    return contexts[name]


def _pick(context: Table, kind: str, entries: dict[str, Table]) -> Table | None:
    """The cluster or user the context names, or None with the problem recorded."""
    name = context.optional(kind)
    if name is None:
        context.problem(kind, "is not set")
        return None
    if name not in entries:
        context.problem(kind, f"{quote(name)} is not one of the {kind}s ({_names(entries)})")
        return None
    return entries[name]


class _Files:
    """Paths of a kubeconfig's files, and the embedded ones (file name -> content)."""

    def __init__(self, base: Path, data_dir: Path) -> None:
        self.base = base
        self.data_dir = data_dir
        self.embedded: dict[str, bytes] = {}

    def path_or_data(self, entry: Table, name: str, filename: str) -> Path | None:
        """The file `name` names (relative to the kubeconfig) or `name`-data will be
        written to."""
        path, data = entry.optional(name), entry.optional(f"{name}-data")
        if path and data:
            entry.problem(name, f"{name} and {name}-data are both set; keep one")
            return None
        if data:
            return self._data(entry, f"{name}-data", data, filename)
        if path:
            resolved = self.base / path  # an absolute path stays as it is
            if (problem := unreadable(resolved)) is not None:
                entry.problem(name, problem)
            return resolved
        return None

    def _data(self, entry: Table, name: str, data: str, filename: str) -> Path | None:
        try:
            # Go's base64 decoder, which kubectl uses, skips line breaks; so does this.
            decoded = base64.b64decode("".join(data.split()), validate=True)
        except ValueError:  # binascii.Error, or a character that is not ASCII
            entry.problem(name, "is not valid base64")
            return None
        if b"-----BEGIN " not in decoded:
            entry.problem(name, 'is not base64 of a PEM file (no "-----BEGIN")')
            return None
        self.embedded[filename] = decoded
        return self.data_dir / filename


def _cluster(entry: Table, files: _Files) -> tuple[str, Path | None, bool]:
    server = entry.optional("server")
    if server is None:
        if entry.raw("server") in (None, ""):  # else optional() reported its type
            entry.problem("server", "is not set")
    elif (problem := url_problem(server, "an https:// URL")) is not None:
        entry.problem("server", problem)
    ca_file = files.path_or_data(entry, "certificate-authority", "ca.crt")
    insecure = entry.boolean("insecure-skip-tls-verify", False)
    if insecure and ca_file is not None:
        entry.problem("insecure-skip-tls-verify", "cannot be true with a certificate-authority")
    return (server or "").rstrip("/"), ca_file, insecure


def _user(entry: Table, files: _Files) -> tuple[TokenSource | None, tuple[Path, Path] | None]:
    for name, what in (
        ("exec", "exec credential plugins"),
        ("auth-provider", "auth-provider plugins"),
        ("username", "basic authentication (username/password)"),
    ):
        if entry.raw(name) is not None:
            entry.problem("", f"{what} {_UNSUPPORTED}")
    cert = files.path_or_data(entry, "client-certificate", "client.crt")
    key = files.path_or_data(entry, "client-key", "client.key")
    has_cert, has_key = _has(entry, "client-certificate"), _has(entry, "client-key")
    if has_cert and not has_key:
        entry.problem("client-key", "is not set, and a client certificate needs it")
    if has_key and not has_cert:
        entry.problem("client-certificate", "is not set, and a client key needs it")
    return _token(entry, files), (cert, key) if cert and key else None


def _has(entry: Table, name: str) -> bool:
    return bool(entry.raw(name) or entry.raw(f"{name}-data"))


def _token(entry: Table, files: _Files) -> TokenSource | None:
    token, token_file = entry.optional("token"), entry.optional("tokenFile")
    if token_file:
        # With both set, client-go re-reads the file after starting with the token;
        # the file is what rotates, so it wins here from the start.
        try:
            return TokenSource.from_file(files.base / token_file)
        except ValueError as e:
            entry.problem("tokenFile", str(e))
            return None
    if token and (problem := token_problem(token)) is not None:
        entry.problem("token", problem)
        return None
    return TokenSource(token) if token else None
