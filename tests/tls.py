"""Test certificates, made with the ``openssl`` command-line tool.

``make_tls(directory)`` writes a small PKI like a kubeadm cluster's: a CA, a server certificate
for ``127.0.0.1`` and ``localhost`` (the apiserver's and the kubelet's), a client certificate
(``CN=kmeshd, O=system:nodes``) for client-certificate authentication, and a second, unrelated
CA with its own server and client certificates for "wrong CA" tests. Keys are EC P-256, so the
whole set takes a few tens of milliseconds. ``tls_files`` is a session-scoped fixture; import it
into a test module (``from tests.tls import tls_files  # noqa: F401``) to use it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# One request config per certificate; "req -x509 -CA" (OpenSSL >= 3.0) signs it in one step.
_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = ext
[dn]
{subject}
[ext]
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
{extensions}
"""

_CA_EXT = "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign"
_LEAF_EXT = "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature"
_SERVER_EXT = f"{_LEAF_EXT}\nextendedKeyUsage = serverAuth\nsubjectAltName = {{san}}"
_CLIENT_EXT = f"{_LEAF_EXT}\nextendedKeyUsage = clientAuth"


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files ``make_tls`` wrote. Keys are unencrypted."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A second CA that nothing else trusts, and certificates it signed.
    wrong_ca_cert: Path
    wrong_ca_key: Path
    wrong_server_cert: Path
    wrong_server_key: Path
    wrong_client_cert: Path
    wrong_client_key: Path


def _issue(
    directory: Path,
    name: str,
    subject: str,
    extensions: str,
    ca: tuple[Path, Path] | None,
) -> tuple[Path, Path]:
    """Write ``name.crt`` and ``name.key``: self-signed when ``ca`` is None, else signed by it."""
    cert, key, config = (directory / f"{name}.{ext}" for ext in ("crt", "key", "cnf"))
    config.write_text(_CONFIG.format(subject=subject, extensions=extensions))
    cmd = ["openssl", "req", "-x509", "-config", str(config), "-days", "3650"]
    cmd += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    cmd += ["-keyout", str(key), "-out", str(cert)]
    if ca is not None:
        cmd += ["-CA", str(ca[0]), "-CAkey", str(ca[1])]
    subprocess.run(cmd, check=True, capture_output=True)
    return cert, key


def make_tls(directory: Path) -> TlsFiles:
    """Generate the whole set into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    server_ext = _SERVER_EXT.format(san="IP:127.0.0.1, DNS:localhost")
    server_subject = "CN = 127.0.0.1"
    client_subject = "O = system:nodes\nCN = kmeshd"
    ca = _issue(directory, "ca", "CN = kmeshd-test-ca", _CA_EXT, None)
    wrong_ca = _issue(directory, "wrong-ca", "CN = unrelated-ca", _CA_EXT, None)
    server = _issue(directory, "server", server_subject, server_ext, ca)
    client = _issue(directory, "client", client_subject, _CLIENT_EXT, ca)
    wrong_server = _issue(directory, "wrong-server", server_subject, server_ext, wrong_ca)
    wrong_client = _issue(directory, "wrong-client", client_subject, _CLIENT_EXT, wrong_ca)
    return TlsFiles(*ca, *server, *client, *wrong_ca, *wrong_server, *wrong_client)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))
