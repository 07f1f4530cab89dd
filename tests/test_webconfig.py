"""metrics.web_config: exporter-toolkit's web config file, parsed and refused line by line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmeshd.errors import ConfigError
from kmeshd.export.webconfig import (
    MAX_BYTES,
    NO_PEM,
    Pem,
    TlsServerConfig,
    WebConfig,
    load_web_config,
    parse_web_config,
    san_matches,
)

P = Path("/etc/kmeshd/web.yml")
HASH = "$2b$04$abcdefghijklmnopqrstuu2r9OfJnfCsdneAXAGHnS4UpFFP8WIrW"  # "secret"
TLS = "tls_server_config:\n  cert_file: tls.crt\n  key_file: /k/tls.key\n"
CERT, KEY = Pem(Path("/etc/kmeshd/tls.crt")), Pem(Path("/k/tls.key"))
VERIFY = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
NOT_BCRYPT = (
    'basic_auth_users.alice: is not a bcrypt hash ($2y$10$ and 53 characters: htpasswd -nBC 10 "")'
)
INLINE = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def tls(**kwargs: object) -> TlsServerConfig:
    return TlsServerConfig(CERT, KEY, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", WebConfig(P)),
        ("# nothing\n", WebConfig(P)),
        ("tls_server_config:\n", WebConfig(P)),
        ("tls_server_config: {}\n", WebConfig(P)),  # no certificate: plain HTTP, as in Go
        (TLS, WebConfig(P, tls())),
        (
            VERIFY,
            WebConfig(
                P,
                tls(
                    client_auth_type="RequireAndVerifyClientCert",
                    client_ca=Pem(Path("/etc/kmeshd/ca.crt")),
                ),
            ),
        ),
        (
            TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: /ca.crt\n",
            WebConfig(
                P, tls(client_auth_type="VerifyClientCertIfGiven", client_ca=Pem(Path("/ca.crt")))
            ),
        ),
        (TLS + "  client_auth_type: NoClientCert\n", WebConfig(P, tls())),
        (TLS + "  client_auth_type: ''\n", WebConfig(P, tls())),
        (TLS + "  min_version: TLS13\n", WebConfig(P, tls(min_version="TLS13"))),
        (TLS + "  max_version: TLS12\n", WebConfig(P, tls(max_version="TLS12"))),
        (
            TLS + "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,"
            " TLS_RSA_WITH_AES_256_CBC_SHA]\n",
            WebConfig(P, tls(ciphers=("ECDHE-RSA-AES128-GCM-SHA256", "AES256-SHA"))),
        ),
        (  # TLS 1.3 suites cannot be chosen, in Go as here: accepted, no change
            TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
            WebConfig(P, tls()),
        ),
        (
            TLS + "  cipher_suites:\n  - TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305\n"
            "  - TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256\n",
            WebConfig(P, tls(ciphers=("ECDHE-ECDSA-CHACHA20-POLY1305",))),
        ),
        (
            TLS + "  prefer_server_cipher_suites: false\n",
            WebConfig(P, tls(prefer_server_cipher_suites=False)),
        ),
        (TLS + "  curve_preferences: [CurveP384]\n", WebConfig(P, tls(curve="secp384r1"))),
        (TLS + "  curve_preferences: []\n", WebConfig(P, tls())),
        (
            VERIFY + "  client_allowed_sans: [kmeshd, 10.0.0.1]\n",
            WebConfig(
                P,
                tls(
                    client_auth_type="RequireAndVerifyClientCert",
                    client_ca=Pem(Path("/etc/kmeshd/ca.crt")),
                    client_allowed_sans=("kmeshd", "10.0.0.1"),
                ),
            ),
        ),
        (
            f"tls_server_config:\n  cert: |\n    {INLINE.replace(chr(10), chr(10) + '    ')}\n"
            "  key_file: /k/tls.key\n",
            WebConfig(P, TlsServerConfig(Pem(text=INLINE), KEY)),
        ),
        (f"basic_auth_users:\n  alice: {HASH}\n", WebConfig(P, users=(("alice", HASH.encode()),))),
        (
            f"basic_auth_users:\n  alice: '{HASH}'\n  bob: '{HASH.replace('$2b$', '$2y$')}'\n",
            WebConfig(
                P, users=(("alice", HASH.encode()), ("bob", HASH.replace("$2b$", "$2y$").encode()))
            ),
        ),
        ("basic_auth_users: {}\n", WebConfig(P)),
        ("http_server_config:\n  http2: false\n", WebConfig(P)),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
            "    Strict-Transport-Security: max-age=31536000\n",
            WebConfig(
                P,
                headers=(
                    ("X-Frame-Options", "deny"),
                    ("Strict-Transport-Security", "max-age=31536000"),
                ),
            ),
        ),
        ("http_server_config:\n  headers:\n    X-XSS-Protection: ''\n", WebConfig(P)),
    ],
)
def test_parse(text: str, expected: WebConfig) -> None:
    """Each key as exporter-toolkit reads it; relative paths from the file's directory."""
    assert parse_web_config(text, P) == expected


@pytest.mark.parametrize(
    ("text", "secured"),
    [
        ("", False),
        (TLS, False),  # encrypted, but anyone may read
        (TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: c\n", False),
        (VERIFY, True),
        (f"basic_auth_users:\n  a: '{HASH}'\n", True),
    ],
)
def test_secured_means_a_scraper_must_prove_who_it_is(text: str, secured: bool) -> None:
    assert parse_web_config(text, P).secured is secured


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- a\n", "not a web config: the file is a list"),
        ("a: [\n", "line 2: expected the node content, but found '<stream end>'"),
        (
            "tls: {}\n",
            "tls: unknown table (known: basic_auth_users, http_server_config,"
            " rate_limit, tls_server_config)",
        ),
        (  # a key with a newline: the problem stays one line
            '"a\\nb": 1\n',
            "a\\nb: unknown key (known: basic_auth_users, http_server_config, rate_limit,"
            " tls_server_config)",
        ),
        (
            "rate_limit:\n  interval: 1s\n",
            "rate_limit: is not supported: remove it (kmeshd serves 64 scrapes at most)",
        ),
        ("tls_server_config: yes\n", "tls_server_config: expected a mapping, got the value True"),
        (
            TLS + "  certfile: x\n",
            "tls_server_config.certfile: unknown key (known: cert, cert_file,"
            " cipher_suites, client_allowed_sans, client_auth_type, client_ca, client_ca_file,"
            " curve_preferences, key, key_file, max_version, min_version,"
            " prefer_server_cipher_suites)",
        ),
        (
            "tls_server_config:\n  cert_file: c\n",
            "tls_server_config.key_file: missing: tls_server_config needs key_file",
        ),
        (
            "tls_server_config:\n  key_file: k\n",
            "tls_server_config.cert_file: missing: tls_server_config needs cert_file",
        ),
        (
            "tls_server_config:\n  cert_file: 5\n  key_file: k\n",
            "tls_server_config.cert_file: expected a string, got the value 5",
        ),
        (
            "tls_server_config:\n  cert_file: c\n  cert: c\n  key_file: k\n",
            "tls_server_config.cert: set either cert (inline PEM) or cert_file, not both",
        ),
        (
            "tls_server_config:\n  cert: /etc/c.crt\n  key_file: k\n",
            "tls_server_config.cert: is not PEM text (-----BEGIN ...); put a path in cert_file",
        ),
        (
            "tls_server_config:\n  client_auth_type: RequireAndVerifyClientCert\n"
            "  client_ca_file: c\n",
            "tls_server_config.cert_file: missing: client certificates need TLS: set cert_file"
            " and key_file",
        ),
        (
            TLS + "  client_auth_type: RequestClientCert\n",
            'tls_server_config.client_auth_type: "RequestClientCert" (a certificate asked for,'
            " never verified) is not possible with Python's ssl, which verifies what it asks"
            " for: use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file",
        ),
        (
            TLS + "  client_auth_type: RequireAnyClientCert\n",
            'tls_server_config.client_auth_type: "RequireAnyClientCert" (a certificate asked for,'
            " never verified) is not possible with Python's ssl, which verifies what it asks"
            " for: use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file",
        ),
        (
            TLS + "  client_auth_type: Always\n",
            'tls_server_config.client_auth_type: "Always" is not a client_auth_type (use'
            " NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert)",
        ),
        (
            TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
            "tls_server_config.client_ca_file: missing: RequireAndVerifyClientCert needs the CA"
            " that signs client certificates",
        ),
        (
            TLS + "  client_ca_file: ca.crt\n",
            "tls_server_config.client_auth_type: client_ca_file is set but no client certificate"
            " is asked for: set client_auth_type to RequireAndVerifyClientCert",
        ),
        (
            TLS + "  client_allowed_sans: [a]\n",
            "tls_server_config.client_allowed_sans: needs client_auth_type"
            " RequireAndVerifyClientCert (else no certificate to match)",
        ),
        (
            VERIFY + "  client_allowed_sans: ['']\n",
            "tls_server_config.client_allowed_sans[0]: must not be empty",
        ),
        (
            VERIFY + "  client_allowed_sans: a\n",
            "tls_server_config.client_allowed_sans: expected an array of strings,"
            ' got the string "a"',
        ),
        (
            TLS + "  min_version: TLS11\n",
            'tls_server_config.min_version: "TLS11" is refused: this host\'s OpenSSL policy'
            ' allows TLS 1.2 and 1.3 only (use "TLS12" or "TLS13")',
        ),
        (
            TLS + "  min_version: TLS10\n",
            'tls_server_config.min_version: "TLS10" is refused: this host\'s OpenSSL policy'
            ' allows TLS 1.2 and 1.3 only (use "TLS12" or "TLS13")',
        ),
        (
            TLS + "  max_version: '1.3'\n",
            'tls_server_config.max_version: "1.3" is not a TLS version (use "TLS12" or "TLS13")',
        ),
        (
            TLS + "  min_version: TLS13\n  max_version: TLS12\n",
            'tls_server_config.max_version: "TLS12" is below min_version "TLS13"',
        ),
        (
            TLS + "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
            'tls_server_config.cipher_suites[0]: "TLS_RSA_WITH_RC4_128_SHA" is insecure:'
            " choose an AES-GCM or CHACHA20 suite",
        ),
        (
            TLS + "  cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256]\n",
            'tls_server_config.cipher_suites[0]: "ECDHE-RSA-AES128-GCM-SHA256" is not a cipher'
            " suite (use Go's names: TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)",
        ),
        (
            TLS + "  cipher_suites: [1]\n",
            "tls_server_config.cipher_suites[0]: expected a string, got the value 1",
        ),
        (
            TLS + "  curve_preferences: [CurveP256, CurveP384]\n",
            "tls_server_config.curve_preferences: lists several curves: Python's ssl can set one"
            " only (list one of CurveP256, CurveP384, CurveP521, or remove the key for"
            " OpenSSL's defaults)",
        ),
        (
            TLS + "  curve_preferences: [X25519]\n",
            'tls_server_config.curve_preferences[0]: "X25519" is not a curve Python\'s ssl can'
            " set alone (use CurveP256, CurveP384, CurveP521, or remove curve_preferences for"
            " OpenSSL's defaults, X25519 first)",
        ),
        (
            TLS + "  prefer_server_cipher_suites: 'no'\n",
            "tls_server_config.prefer_server_cipher_suites: expected true or false,"
            ' got the string "no"',
        ),
        ("http_server_config: []\n", "http_server_config: expected a mapping, got a list"),
        (
            "http_server_config:\n  http3: true\n",
            "http_server_config.http3: unknown key (known: headers, http2)",
        ),
        (
            "http_server_config:\n  headers:\n    Server: kmeshd\n",
            "http_server_config.headers.Server: unknown key (known: Content-Security-Policy,"
            " Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options,"
            " X-XSS-Protection)",
        ),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
            'http_server_config.headers.X-Frame-Options: "allow" is not allowed'
            " (use deny or sameorigin)",
        ),
        (
            "http_server_config:\n  headers:\n"
            '    Content-Security-Policy: "a\\r\\nSet-Cookie: x"\n',
            "http_server_config.headers.Content-Security-Policy:"
            ' "a\\r\\nSet-Cookie: x" has control characters',
        ),
        ("basic_auth_users: [a]\n", "basic_auth_users: expected a mapping, got a list"),
        (
            "basic_auth_users:\n  alice: secret\n",
            NOT_BCRYPT,
        ),
        (
            f"basic_auth_users:\n  alice: '{HASH[:-1]}'\n",
            NOT_BCRYPT,
        ),
        (
            f"basic_auth_users:\n  alice: '{HASH.replace('$04$', '$03$')}'\n",
            NOT_BCRYPT,
        ),
        (
            "basic_auth_users:\n  alice: 12\n",
            "basic_auth_users.alice: expected a bcrypt hash, got the value 12",
        ),
        (
            f"basic_auth_users:\n  'a:b': '{HASH}'\n",
            "basic_auth_users: \"a:b\" is not a user name (a non-empty string without ':')",
        ),
        (
            f"basic_auth_users:\n  7: '{HASH}'\n",
            "basic_auth_users: \"7\" is not a user name (a non-empty string without ':')",
        ),
    ],
)
def test_problem(text: str, problem: str) -> None:
    """Each refusal is one line naming the file, the key path and what to write instead."""
    with pytest.raises(ConfigError) as e:
        parse_web_config(text, P)
    assert e.value.problems == [f"{P}: {problem}"]


def test_every_problem_at_once() -> None:
    text = TLS + "  min_version: TLS11\n  colour: red\nbasic_auth_users:\n  a: b\n"
    with pytest.raises(ConfigError) as e:
        parse_web_config(text, P)
    assert [line.split(": ")[1] for line in e.value.problems] == [
        "tls_server_config.colour",
        "tls_server_config.min_version",
        "basic_auth_users.a",
    ]


@pytest.mark.parametrize(
    ("allowed", "sans", "matches"),
    [
        (("kmeshd",), (("DNS", "kmeshd"),), True),
        (("kmeshd",), (("DNS", "kmeshd.example"),), False),
        (("kmeshd",), (), False),
        (("10.0.0.1",), (("IP Address", "10.0.0.1"),), True),
        (("2001:db8::1",), (("IP Address", "2001:DB8:0:0:0:0:0:1\n"),), True),
        (("a@example.org",), (("email", "a@example.org"),), True),
        (("spiffe://c/ns/x",), (("URI", "spiffe://c/ns/x"),), True),
        (("10.0.0.1",), (("DNS", "10.0.0.2"), ("IP Address", "10.0.0.1")), True),
    ],
)
def test_san_matches(
    allowed: tuple[str, ...], sans: tuple[tuple[str, str], ...], matches: bool
) -> None:
    assert san_matches(allowed, sans) is matches


def test_load_reads_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  alice: '{HASH}'\n")
    assert load_web_config(path) == WebConfig(path, users=(("alice", HASH.encode()),))


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: None, "cannot read: No such file or directory (metrics.web_config)"),
        (lambda p: p.mkdir(), "not a regular file (metrics.web_config names a file)"),
        (lambda p: os.mkfifo(p), "not a regular file (metrics.web_config names a file)"),
        (
            lambda p: p.write_bytes(b"a" * (MAX_BYTES + 1)),
            f"larger than {MAX_BYTES} bytes: not a web config file",
        ),
        (
            lambda p: p.write_bytes(b"a: \xff\n"),
            "cannot read: not UTF-8 text (byte 0xff at offset 3)",
        ),
        (
            lambda p: p.write_text("[" * 5000),
            "sequences or mappings are nested too deeply (flatten them)",
        ),
    ],
)
def test_load_refuses(tmp_path: Path, make: object, problem: str) -> None:
    path = tmp_path / "web.yml"
    make(path)  # type: ignore[operator]
    with pytest.raises(ConfigError) as e:
        load_web_config(path)
    assert e.value.problems[0].startswith(f"{path}: {problem}")


def test_no_pem_is_false() -> None:
    assert not NO_PEM and Pem(text="x") and Pem(Path("/x"))
