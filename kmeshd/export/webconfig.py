"""metrics.web_config: the exporter-toolkit web config file (node_exporter's
--web.config.file) -> a validated, frozen WebConfig.

Operators reuse the file their node_exporter reads: `tls_server_config`,
`http_server_config` and `basic_auth_users`, with the same keys and defaults. What
Python's ssl module can do exactly is taken as it is; what it cannot (a client certificate
asked for but not verified, TLS below 1.2 under the host's OpenSSL policy, a list of
curves) is refused with what to write instead, never served with weaker security than
the file asks for. Unknown keys are errors, as in exporter-toolkit.

Parsing is pure (`parse_web_config`); `load_web_config` reads the file first, as a
hostile input: a regular file, at most MAX_BYTES, YAML errors as one line naming it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from kmeshd.errors import ConfigError
from kmeshd.validate import Problems, Table, describe_yaml, quote, read_yaml

MAX_BYTES = 1 << 20  # a web config is a few hundred bytes; more is a wrong file

# Go's tls.CipherSuites() (what exporter-toolkit accepts) -> OpenSSL's names for the same
# suites, for TLS 1.2 and below. Go never lets TLS 1.3 suites be chosen, and neither does
# this: the three TLS 1.3 names are accepted and change nothing, as in Go.
CIPHER_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    # Go's older spellings of the last two.
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
}
TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
# Go's tls.InsecureCipherSuites(): exporter-toolkit refuses them too.
INSECURE_SUITES = (
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
)
# Go's CurveID names -> OpenSSL's. Python's ssl sets one curve (for TLS 1.2 and 1.3 alike).
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1"}
VERSIONS = ("TLS12", "TLS13")  # in order; TLS10 and TLS11 are refused (see _version)
OLD_VERSIONS = ("TLS10", "TLS11")
CLIENT_AUTH_TYPES = ("NoClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
# Asked for but not verified: Python's ssl verifies every certificate it asks for.
UNVERIFIED_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# http_server_config.headers: the names exporter-toolkit takes, and the values it checks.
HEADERS = (
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
)
_HEADER_VALUES = {"X-Frame-Options": ("deny", "sameorigin"), "X-Content-Type-Options": ("nosniff",)}
# A bcrypt hash: $2a$, $2b$ or $2y$ (the same algorithm), a cost of 4-31, 53 characters.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_TLS_KEYS = (
    "cert",
    "cert_file",
    "cipher_suites",
    "client_allowed_sans",
    "client_auth_type",
    "client_ca",
    "client_ca_file",
    "curve_preferences",
    "key",
    "key_file",
    "max_version",
    "min_version",
    "prefer_server_cipher_suites",
)


@dataclass(frozen=True, slots=True)
class Pem:
    """A PEM file's path, or the PEM text itself (written inline in the web config)."""

    path: Path | None = None
    text: str = ""

    def __bool__(self) -> bool:
        return self.path is not None or bool(self.text)


NO_PEM = Pem()


@dataclass(frozen=True, slots=True)
class TlsServerConfig:
    cert: Pem
    key: Pem
    client_auth_type: str = "NoClientCert"  # of CLIENT_AUTH_TYPES
    client_ca: Pem = NO_PEM
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"  # of VERSIONS
    max_version: str = "TLS13"
    ciphers: tuple[str, ...] = ()  # OpenSSL names; () = OpenSSL's defaults
    prefer_server_cipher_suites: bool = True
    curve: str = ""  # an OpenSSL curve name; "" = OpenSSL's defaults


@dataclass(frozen=True, slots=True)
class WebConfig:
    path: Path
    tls: TlsServerConfig | None = None  # None: plain HTTP
    users: tuple[tuple[str, bytes], ...] = ()  # name, bcrypt hash; () = no basic auth
    headers: tuple[tuple[str, str], ...] = ()  # added to every response

    @property
    def secured(self) -> bool:
        """Whether a scraper must prove who it is, with a client certificate or a password
        (TLS alone protects the data on the way, not who may read it)."""
        required = self.tls and self.tls.client_auth_type == "RequireAndVerifyClientCert"
        return bool(self.users) or bool(required)


def load_web_config(path: Path) -> WebConfig:
    """The web config in `path`, read and validated; ConfigError with every problem."""
    return parse_web_config(read_web_config(path), path)


def read_web_config(path: Path) -> str:
    """The text of `path`: a regular file of at most MAX_BYTES in UTF-8; else ConfigError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror} (metrics.web_config)"]) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError([f"{path}: not a regular file (metrics.web_config names a file)"])
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_BYTES} bytes: not a web config file"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{e.object[e.start]:02x} at offset {e.start}"
        raise ConfigError([f"{path}: cannot read: not UTF-8 text ({where})"]) from e


def parse_web_config(text: str, path: Path) -> WebConfig:
    """The validated web config in `text` (the file at `path`, which relative paths in it
    are relative to, as in exporter-toolkit); ConfigError with every problem found, each
    one line."""
    try:
        return _parse(text, path)
    except ConfigError as e:
        # A key may hold any character, a newline too: the journal gets one line each.
        raise ConfigError([_one_line(problem) for problem in e.problems]) from e


def _parse(text: str, path: Path) -> WebConfig:
    problems = Problems(path)
    doc = Table(_parse_yaml(text, path), "", problems, _TOP_KEYS, describe_yaml)
    config = WebConfig(path, _tls(doc, path.parent), _users(doc), _headers(doc))
    problems.raise_if_any()
    return config


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


_TOP_KEYS = ("basic_auth_users", "http_server_config", "rate_limit", "tls_server_config")


def _parse_yaml(text: str, path: Path) -> dict[str, object]:
    doc = read_yaml(text, path)
    if doc is None:
        return {}  # an empty file: plain HTTP and no auth, as exporter-toolkit has it
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}: not a web config: the file is {describe_yaml(doc)}"])
    return doc


def _mapping(doc: Table, name: str, known: tuple[str, ...]) -> Table | None:
    """The sub-mapping `name`, None if absent or null (a problem noted if not a mapping)."""
    if doc.raw(name) is None:
        return None
    if not isinstance(doc.raw(name), dict):
        _wrong(doc, name)
        return None
    return doc.table(name, known)


def _wrong(doc: Table, name: str) -> None:
    doc.problem(name, f"expected a mapping, got {describe_yaml(doc.raw(name))}")


def _tls(doc: Table, base: Path) -> TlsServerConfig | None:
    if doc.has("rate_limit"):
        doc.problem("rate_limit", "is not supported: remove it (kmeshd serves 64 scrapes at most)")
    t = _mapping(doc, "tls_server_config", _TLS_KEYS)
    if t is None:
        return None
    cert, key = _pem(t, "cert", base), _pem(t, "key", base)
    auth = _client_auth(t)
    client_ca = _pem(t, "client_ca", base)
    sans = tuple(value for _, value in _list(t, "client_allowed_sans"))
    _check_client_auth(t, auth, client_ca, sans)
    if not cert and not key:
        _no_tls(t, auth, client_ca, sans)
        return None
    for name, value in (("cert", cert), ("key", key)):
        if not value and not t.has(f"{name}_file"):  # a wrong type is a problem already
            t.problem(f"{name}_file", f"missing: tls_server_config needs {name}_file")
    low, high = _version(t, "min_version", "TLS12"), _version(t, "max_version", "TLS13")
    if VERSIONS.index(low) > VERSIONS.index(high):
        t.problem("max_version", f"{quote(high)} is below min_version {quote(low)}")
    return TlsServerConfig(
        cert,
        key,
        auth,
        client_ca,
        sans,
        low,
        high,
        _ciphers(t),
        _boolean(t, "prefer_server_cipher_suites", True),
        _curve(t),
    )


def _no_tls(t: Table, auth: str, client_ca: Pem, sans: tuple[str, ...]) -> None:
    """exporter-toolkit serves plain HTTP when no certificate is set, whatever else the
    table says; a client_auth_type there would be silently ignored, so it is refused."""
    if auth != "NoClientCert" or client_ca or sans:
        t.problem("cert_file", "missing: client certificates need TLS: set cert_file and key_file")


def _pem(t: Table, name: str, base: Path) -> Pem:
    """`name_file` (a path, relative to the web config's directory) or `name` (inline PEM)."""
    path, text = t.string(f"{name}_file", ""), t.string(name, "")
    if path and text:
        t.problem(name, f"set either {name} (inline PEM) or {name}_file, not both")
    if path:
        return Pem(path=base / path)
    if text and "-----BEGIN " not in text:
        t.problem(name, "is not PEM text (-----BEGIN ...); put a path in " + f"{name}_file")
    return Pem(text=text)


def _client_auth(t: Table) -> str:
    value = t.string("client_auth_type", "NoClientCert") or "NoClientCert"
    if value in CLIENT_AUTH_TYPES:
        return value
    if value in UNVERIFIED_AUTH_TYPES:
        t.problem(
            "client_auth_type",
            f"{quote(value)} (a certificate asked for, never verified) is not possible with"
            " Python's ssl, which verifies what it asks for: use RequireAndVerifyClientCert"
            " (or VerifyClientCertIfGiven) with client_ca_file",
        )
    else:
        t.problem(
            "client_auth_type",
            f"{quote(value)} is not a client_auth_type (use {', '.join(CLIENT_AUTH_TYPES)})",
        )
    return "NoClientCert"


def _check_client_auth(t: Table, auth: str, client_ca: Pem, sans: tuple[str, ...]) -> None:
    if auth == "NoClientCert":
        if client_ca:
            t.problem(
                "client_auth_type",
                "client_ca_file is set but no client certificate is asked for: set"
                " client_auth_type to RequireAndVerifyClientCert",
            )
    elif not client_ca:
        t.problem("client_ca_file", f"missing: {auth} needs the CA that signs client certificates")
    if sans and auth != "RequireAndVerifyClientCert":
        t.problem(
            "client_allowed_sans",
            "needs client_auth_type RequireAndVerifyClientCert (else no certificate to match)",
        )


def _list(t: Table, name: str) -> list[tuple[str, str]]:
    """A YAML list of non-empty strings as (key path, value); null is empty."""
    if t.raw(name) is None:
        return []
    pairs = t.strings(name)
    for key, value in pairs:
        if not value:
            t.problems.add(key, "must not be empty")
    return [(k, v) for k, v in pairs if v]


def _version(t: Table, name: str, default: str) -> str:
    value = t.string(name, default) or default
    if value in VERSIONS:
        return value
    if value in OLD_VERSIONS:
        t.problem(
            name,
            f"{quote(value)} is refused: this host's OpenSSL policy allows TLS 1.2 and 1.3"
            ' only (use "TLS12" or "TLS13")',
        )
    else:
        t.problem(name, f'{quote(value)} is not a TLS version (use "TLS12" or "TLS13")')
    return default


def _ciphers(t: Table) -> tuple[str, ...]:
    chosen: list[str] = []
    for key, name in _list(t, "cipher_suites"):
        if name in CIPHER_SUITES:
            if CIPHER_SUITES[name] not in chosen:
                chosen.append(CIPHER_SUITES[name])
        elif name in INSECURE_SUITES:
            t.problems.add(key, f"{quote(name)} is insecure: choose an AES-GCM or CHACHA20 suite")
        elif name not in TLS13_SUITES:
            example = "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
            t.problems.add(key, f"{quote(name)} is not a cipher suite (use Go's names: {example})")
    return tuple(chosen)


def _curve(t: Table) -> str:
    curves = _list(t, "curve_preferences")
    if len(curves) > 1:
        t.problem(
            "curve_preferences",
            "lists several curves: Python's ssl can set one only (list one of "
            + f"{', '.join(CURVES)}, or remove the key for OpenSSL's defaults)",
        )
        return ""
    for key, name in curves:
        if name in CURVES:
            return CURVES[name]
        t.problems.add(
            key,
            f"{quote(name)} is not a curve Python's ssl can set alone (use {', '.join(CURVES)},"
            " or remove curve_preferences for OpenSSL's defaults, X25519 first)",
        )
    return ""


def _boolean(t: Table, name: str, default: bool) -> bool:
    return default if t.raw(name) is None else t.boolean(name, default)


def _headers(doc: Table) -> tuple[tuple[str, str], ...]:
    h = _mapping(doc, "http_server_config", ("headers", "http2"))
    if h is None:
        return ()
    _boolean(h, "http2", True)  # HTTP/1.1 is what kmeshd serves either way; scrapers use it
    headers = _mapping(h, "headers", HEADERS)
    if headers is None:
        return ()
    chosen = []
    for name in HEADERS:
        value = headers.string(name, "")
        allowed = _HEADER_VALUES.get(name)
        if value and allowed and value.lower() not in allowed:
            headers.problem(name, f"{quote(value)} is not allowed (use {' or '.join(allowed)})")
        elif value and not _printable(value):
            headers.problem(name, f"{quote(value)} has control characters")
        elif value:
            chosen.append((name, value))
    return tuple(chosen)


def _printable(value: str) -> bool:
    return value.isprintable() and value.isascii()


def _users(doc: Table) -> tuple[tuple[str, bytes], ...]:
    users = doc.raw("basic_auth_users")
    if users is None:
        return ()
    if not isinstance(users, dict):
        _wrong(doc, "basic_auth_users")
        return ()
    chosen = []
    for name, hashed in users.items():
        key = doc.path(f"basic_auth_users.{name}")
        if not isinstance(name, str) or not name or ":" in name or not _printable(name):
            doc.problems.add(
                doc.path("basic_auth_users"),
                f"{quote(str(name))} is not a user name (a non-empty string without ':')",
            )
        elif not isinstance(hashed, str):
            doc.problems.add(key, f"expected a bcrypt hash, got {describe_yaml(hashed)}")
        elif not _BCRYPT.fullmatch(hashed):
            doc.problems.add(
                key, 'is not a bcrypt hash ($2y$10$ and 53 characters: htpasswd -nBC 10 "")'
            )
        else:
            chosen.append((name, hashed.encode()))
    return tuple(chosen)


def san_matches(allowed: tuple[str, ...], sans: tuple[tuple[str, str], ...]) -> bool:
    """Whether one of a certificate's subjectAltNames (as ssl's getpeercert() gives them)
    is exactly one of `allowed`; IP addresses compared as addresses, not as text."""
    wanted = set(allowed) | {_ip_text(a) for a in allowed}
    for kind, value in sans:
        text = _ip_text(value.strip()) if kind == "IP Address" else value
        if text in wanted:
            return True
    return False


def _ip_text(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text
