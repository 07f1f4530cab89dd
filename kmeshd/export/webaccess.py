"""Who may scrape /metrics: the TLS context and the basic-auth check a web config asks for.

`open_access` reads metrics.web_config and every file it names (certificates, keys, the
client CA) and returns an `Access`, which the listener swaps in whole: at start-up, and on
SIGHUP through reload.prepare, so rotated certificates and changed users take effect
without a restart, and a bad file changes nothing (ConfigError before anything is swapped).

Basic auth checks a bcrypt hash per attempt, 50-250 ms of CPU each: attempts take turns
(one core at most, however many connections try), an unknown user costs as much as a
known one (no telling which names exist by timing), and successful checks are remembered
(the last CACHE_SIZE) so that a scrape every few seconds costs nothing after the first.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from kmeshd.config import Config
from kmeshd.errors import ConfigError
from kmeshd.export.webconfig import Pem, TlsServerConfig, WebConfig, load_web_config

log = logging.getLogger("kmeshd")

CACHE_SIZE = 64  # successful checks remembered: a few scrapers, a few users
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CERT_REQS = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


class BasicAuth:
    """Checks an Authorization header against bcrypt hashes; see the module docstring."""

    def __init__(self, users: tuple[tuple[str, bytes], ...]) -> None:
        self._users = dict(users)
        # An unknown user is checked against the costliest hash, and refused whatever the
        # result: as long as a real check, or longer.
        self._decoy = max(self._users.values(), key=lambda h: h[4:6])
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self.checks = 0  # bcrypt checks made (cache misses)

    def allows(self, header: str | None) -> bool:
        """Whether `header` (the Authorization header's value) names a user and the password."""
        credentials = parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed or b""))).digest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return True
            self.checks += 1
            ok = _checkpw(password, hashed or self._decoy) and hashed is not None
            if ok:
                self._cache[key] = None
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return ok


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # a NUL byte in the password: bcrypt cannot hash it
        return False


def parse_basic(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) of "Basic base64(user:password)"; None for anything else."""
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
        user, colon, password = decoded.partition(b":")
        name = user.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (name, password) if colon else None


@dataclass(frozen=True)
class Access:
    """What a connection must pass, swapped whole by the listener (reload)."""

    context: ssl.SSLContext | None = None  # None: plain HTTP
    allowed_sans: tuple[str, ...] = ()
    auth: BasicAuth | None = None
    headers: tuple[tuple[str, str], ...] = ()
    secured: bool = False  # a client certificate or a password is needed


def open_access(config: Config) -> Access:
    """The Access metrics.web_config asks for, every file it names read; ConfigError."""
    if not config.metrics.web_config:
        return Access()
    web = load_web_config(Path(config.metrics.web_config))
    return access_of(web)


def access_of(web: WebConfig) -> Access:
    """The Access of a parsed web config, its certificate files read; ConfigError."""
    context = tls_context(web.tls, web.path) if web.tls else None
    return Access(
        context,
        web.tls.client_allowed_sans if web.tls else (),
        BasicAuth(web.users) if web.users else None,
        web.headers,
        web.secured,
    )


def tls_context(tls: TlsServerConfig, path: Path) -> ssl.SSLContext:
    """A server context for `tls`, its certificate, key and CA loaded; ConfigError naming
    the key (in the web config at `path`) whose file is wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.maximum_version = _VERSIONS[tls.max_version]
    if tls.ciphers:
        context.set_ciphers(":".join(tls.ciphers))
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.curve:
        context.set_ecdh_curve(tls.curve)
    _load_chain(context, tls, path)
    context.verify_mode = _CERT_REQS[tls.client_auth_type]
    if tls.client_ca:
        _load_ca(context, tls.client_ca, path)
    return context


def _where(path: Path, pem: Pem, name: str) -> str:
    """The key and file a problem is about: "web.yml: tls_server_config.cert_file: /x.crt"."""
    key = f"tls_server_config.{name}_file" if pem.path else f"tls_server_config.{name}"
    return f"{path}: {key}: {pem.path}" if pem.path else f"{path}: {key}"


def _load_chain(context: ssl.SSLContext, tls: TlsServerConfig, path: Path) -> None:
    with _as_file(tls.cert, path, "cert") as cert, _as_file(tls.key, path, "key") as key:
        try:
            # A password callback that refuses: OpenSSL would otherwise prompt on a terminal.
            context.load_cert_chain(cert, key, password=_no_password)
        except _Encrypted as e:
            raise ConfigError(
                [f"{_where(path, tls.key, 'key')}: the key is encrypted: decrypt it"]
            ) from e
        except ssl.SSLError as e:
            raise ConfigError([_chain_problem(tls, path, e)]) from e
        except OSError as e:
            raise ConfigError([f"{_where(path, tls.cert, 'cert')}: cannot read: {e}"]) from e


class _Encrypted(Exception):
    pass


def _no_password() -> str:
    raise _Encrypted


def _chain_problem(tls: TlsServerConfig, path: Path, e: ssl.SSLError) -> str:
    if e.reason == "KEY_VALUES_MISMATCH":
        return f"{_where(path, tls.key, 'key')}: does not match the certificate (cert_file)"
    if "-----BEGIN CERTIFICATE-----" not in _peek(tls.cert):
        return f"{_where(path, tls.cert, 'cert')}: holds no PEM certificate"
    if "PRIVATE KEY-----" not in _peek(tls.key):
        return f"{_where(path, tls.key, 'key')}: holds no PEM private key"
    return f"{_where(path, tls.key, 'key')}: cannot load the certificate and key: {e}"


def _peek(pem: Pem) -> str:
    if pem.path is None:
        return pem.text
    try:
        with open(pem.path, "rb") as f:
            return f.read(1 << 20).decode("ascii", "replace")
    except OSError:
        return ""


def _load_ca(context: ssl.SSLContext, ca: Pem, path: Path) -> None:
    try:
        if ca.path is not None:
            context.load_verify_locations(cafile=str(ca.path))
        else:
            context.load_verify_locations(cadata=ca.text)
    except ssl.SSLError as e:
        raise ConfigError([f"{_where(path, ca, 'client_ca')}: holds no PEM certificate"]) from e
    except OSError as e:
        raise ConfigError([f"{_where(path, ca, 'client_ca')}: cannot read: {e.strerror}"]) from e


@contextmanager
def _as_file(pem: Pem, path: Path, name: str) -> Iterator[str]:
    """A path ssl can load `pem` from: its file, or the inline text in a memory file."""
    if pem.path is not None:
        if pem.path.exists() and not pem.path.is_file():
            raise ConfigError([f"{_where(path, pem, name)}: not a regular file"])
        if not pem.path.exists():
            raise ConfigError([f"{_where(path, pem, name)}: does not exist"])
        yield str(pem.path)
        return
    fd = os.memfd_create(f"kmeshd-{name}", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem.text.encode())
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def exposed(host: str) -> bool:
    """Whether a listener bound to `host` (an address) is reachable from other hosts."""
    try:
        return not ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return True


def warn_if_exposed(address: str, access: Access, listen: str) -> None:
    if exposed(address) and not access.secured:
        log.warning(
            "metrics.listen %s is reachable from other hosts and /metrics asks for neither a"
            " client certificate nor a password: set metrics.web_config (kmeshd(8), SECURITY)",
            listen,
        )
