"""Property-based: metrics.web_config and the Authorization header hold up to garbage. A
web config either parses or is refused with one `file: key: problem` line per problem;
a header either names a user and password or is refused; nothing raises anything else."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kmeshd.errors import ConfigError
from kmeshd.export.webaccess import BasicAuth, parse_basic
from kmeshd.export.webconfig import (
    CIPHER_SUITES,
    CLIENT_AUTH_TYPES,
    CURVES,
    HEADERS,
    INSECURE_SUITES,
    WebConfig,
    parse_web_config,
    san_matches,
)

P = Path("/etc/kmeshd/web.yml")
HASH = "$2b$04$abcdefghijklmnopqrstuu2r9OfJnfCsdneAXAGHnS4UpFFP8WIrW"  # "secret"
AUTH = BasicAuth((("alice", HASH.encode()),))

# What a web config's values can be, the right ones among them.
WORDS = st.sampled_from(
    [
        *CIPHER_SUITES,
        *INSECURE_SUITES,
        *CLIENT_AUTH_TYPES,
        *CURVES,
        "RequestClientCert",
        "TLS10",
        "TLS12",
        "TLS13",
        "X25519",
        "/etc/kmeshd/tls.crt",
        "tls.key",
        "deny",
        "nosniff",
        HASH,
        "-----BEGIN CERTIFICATE-----\nx\n",
        "",
    ]
)
SCALARS = WORDS | st.text() | st.integers() | st.booleans() | st.none() | st.floats()
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
TLS_KEYS = st.sampled_from(
    [
        "cert_file",
        "key_file",
        "cert",
        "key",
        "client_ca_file",
        "client_ca",
        "client_auth_type",
        "client_allowed_sans",
        "min_version",
        "max_version",
        "cipher_suites",
        "prefer_server_cipher_suites",
        "curve_preferences",
    ]
) | st.text(max_size=8)
DOCS = st.fixed_dictionaries(
    {},
    optional={
        "tls_server_config": st.dictionaries(TLS_KEYS, VALUES, max_size=6) | VALUES,
        "http_server_config": st.fixed_dictionaries(
            {},
            optional={
                "http2": VALUES,
                "headers": st.dictionaries(st.sampled_from(HEADERS) | st.text(), VALUES) | VALUES,
            },
        )
        | VALUES,
        "basic_auth_users": st.dictionaries(st.text() | st.integers(), WORDS | VALUES) | VALUES,
        "rate_limit": VALUES,
    },
) | st.dictionaries(st.text(), VALUES, max_size=3)


def parsed_or_refused(text: str) -> WebConfig | None:
    """The web config, or None after checking that each problem is one line about P."""
    try:
        return parse_web_config(text, P)
    except ConfigError as e:
        assert e.problems
        for problem in e.problems:
            assert problem.startswith(f"{P}: ") and "\n" not in problem, problem
        return None


@given(st.text())
def test_any_text_parses_or_is_refused_line_by_line(text: str) -> None:
    parsed_or_refused(text)


@given(DOCS)
def test_any_document_parses_or_is_refused_line_by_line(doc: dict[str, object]) -> None:
    config = parsed_or_refused(yaml.safe_dump(doc))
    if config is not None and config.tls is not None:
        # What parses is what ssl can do: a version pair in order, OpenSSL cipher names.
        assert (config.tls.min_version, config.tls.max_version) != ("TLS13", "TLS12")
        assert set(config.tls.ciphers) <= set(CIPHER_SUITES.values())
        assert config.tls.cert and config.tls.key


@given(st.text())
def test_any_header_is_a_user_and_password_or_nothing(header: str) -> None:
    credentials = parse_basic(header)
    assert credentials is None or (
        isinstance(credentials[0], str) and isinstance(credentials[1], bytes)
    )


@given(st.text().filter(lambda u: ":" not in u), st.binary())
def test_a_basic_header_gives_back_its_user_and_password(user: str, password: bytes) -> None:
    encoded = base64.b64encode(user.encode() + b":" + password).decode()
    assert parse_basic(f"Basic {encoded}") == (user, password)


@given(st.sampled_from(["alice", "bob", ""]) | st.text(), st.binary(max_size=80))
def test_only_alices_password_lets_in(user: str, password: bytes) -> None:
    header = "Basic " + base64.b64encode(user.encode() + b":" + password).decode()
    expected = user == "alice" and password == b"secret"
    if b"\0" not in password and len(password) > 72:  # bcrypt reads 72 bytes at most
        expected = user == "alice" and bcrypt.checkpw(password, HASH.encode())
    assert AUTH.allows(header) is expected


@given(
    st.lists(st.text(), max_size=3),
    st.lists(
        st.tuples(st.sampled_from(["DNS", "IP Address", "email", "URI"]) | st.text(), st.text()),
        max_size=3,
    ),
)
def test_san_matching_never_raises(allowed: list[str], sans: list[tuple[str, str]]) -> None:
    matched = san_matches(tuple(allowed), tuple(sans))
    assert matched is False or allowed
