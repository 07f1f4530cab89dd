"""/metrics over real TLS (tests/tls.py's certificates) with client certificates and basic
auth: who gets in, who does not, what a stalled handshake costs, and a reload that swaps
certificates and users under a running listener."""

from __future__ import annotations

import base64
import http.client as httpclient
import logging
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest

from kmeshd.config import Config, MetricsConfig
from kmeshd.errors import ConfigError
from kmeshd.export import http
from kmeshd.export.http import Body, MetricsServer, open_listener
from kmeshd.export.webaccess import BasicAuth, open_access, parse_basic
from tests.daemon_proc import free_port
from tests.test_daemon import Host
from tests.tls import TlsFiles, tls_files  # noqa: F401

OK = b"process_cpu_seconds_total"
COST = 4  # the cheapest bcrypt: the tests check logic, not hashing time
ALICE = bcrypt.hashpw(b"secret", bcrypt.gensalt(COST)).decode()
TLS_1_1_CLIENT = ["--tlsv1.1", "--tls-max", "1.1", "--ciphers", "DEFAULT:@SECLEVEL=0"]


def web_config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "web.yml"
    path.write_text(text)
    listen = f"127.0.0.1:{free_port()}"
    return Config(metrics=MetricsConfig(listen=listen, web_config=str(path)))


def tls_yml(t: TlsFiles, client: bool = True) -> str:
    text = f"tls_server_config:\n  cert_file: {t.server_cert}\n  key_file: {t.server_key}\n"
    if client:
        text += f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {t.ca_cert}\n"
    return text


def serve(config: Config) -> MetricsServer:
    server = open_listener(config)
    assert server is not None
    server.publish(Body())
    return server


@pytest.fixture
def mtls(tmp_path: Path, tls_files: TlsFiles) -> Iterator[MetricsServer]:  # noqa: F811
    server = serve(web_config(tmp_path, tls_yml(tls_files)))
    yield server
    server.close()


@pytest.fixture
def basic(tmp_path: Path, tls_files: TlsFiles) -> Iterator[MetricsServer]:  # noqa: F811
    text = tls_yml(tls_files, client=False) + f"basic_auth_users:\n  alice: '{ALICE}'\n"
    server = serve(web_config(tmp_path, text))
    yield server
    server.close()


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def get(port: int, context: ssl.SSLContext, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"https://127.0.0.1:{port}/metrics")
    if auth is not None:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as r:
            return r.status, bytes(r.read())
    except urllib.error.HTTPError as e:
        return e.code, bytes(e.read())


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def curl(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("curl"), "apt-get install curl"
    url = f"https://127.0.0.1:{port}/metrics"
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
    return subprocess.run([*command, *args, url], capture_output=True, text=True, check=False)


# -- client certificates -------------------------------------------------------------------


def test_a_client_certificate_from_the_ca_is_let_in(
    mtls: MetricsServer,
    tls_files: TlsFiles,  # noqa: F811
) -> None:
    t = tls_files
    status, body = get(mtls.port, client_context(t.ca_cert, t.client_cert, t.client_key))
    assert status == 200 and OK in body
    assert mtls._server.rejected == 0


@pytest.mark.parametrize(
    "client",
    [
        pytest.param((), id="no-certificate"),
        pytest.param(("wrong_client_cert", "wrong_client_key"), id="certificate-of-another-ca"),
    ],
)
def test_without_a_certificate_the_ca_signed_the_handshake_fails(
    mtls: MetricsServer,
    tls_files: TlsFiles,  # noqa: F811
    client: tuple[str, str],
) -> None:
    t = tls_files
    files = [getattr(t, name) for name in client]
    with pytest.raises((ssl.SSLError, ConnectionResetError, urllib.error.URLError)):
        get(mtls.port, client_context(t.ca_cert, *files))
    deadline = time.monotonic() + 2
    while mtls._server.rejected != 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # the server's side of a TLS 1.3 handshake ends after the client's
    assert mtls._server.rejected == 1


def test_curl_is_refused_without_a_certificate_and_from_another_ca(
    mtls: MetricsServer,
    tls_files: TlsFiles,  # noqa: F811
) -> None:
    t = tls_files
    ca = ["--cacert", str(t.ca_cert)]
    good = curl(mtls.port, *ca, "--cert", str(t.client_cert), "--key", str(t.client_key))
    assert (good.returncode, good.stdout) == (0, "200")
    # curl reports the refusal as 35 (handshake), 55 or 56 (the connection gone), by timing
    none = curl(mtls.port, *ca)
    assert none.returncode in (35, 55, 56) and none.stdout == "000"
    wrong = curl(
        mtls.port, *ca, "--cert", str(t.wrong_client_cert), "--key", str(t.wrong_client_key)
    )
    assert wrong.returncode in (35, 55, 56) and wrong.stdout == "000"


def test_tls_1_1_is_refused(
    mtls: MetricsServer,
    tls_files: TlsFiles,  # noqa: F811
    tmp_path: Path,
) -> None:
    """curl offers TLS 1.1 (made able to: the control below proves it) and the server
    answers with a protocol_version alert."""
    t = tls_files
    refused = curl(
        mtls.port, "-k", *TLS_1_1_CLIENT, "--cert", str(t.client_cert), "--key", str(t.client_key)
    )
    assert refused.returncode == 35 and "alert protocol version" in refused.stderr
    assert mtls._server.rejected == 1
    # The control: the same curl against a server that allows TLS 1.1 gets its answer.
    port = free_port()
    server = subprocess.Popen(
        [
            *("openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-www", "-tls1_1"),
            *("-cipher", "DEFAULT:@SECLEVEL=0", "-cert", str(t.server_cert)),
            *("-key", str(t.server_key)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            control = curl(port, "-k", *TLS_1_1_CLIENT)
            if control.returncode != 7:  # 7: not listening yet
                break
            time.sleep(0.1)
        assert (control.returncode, control.stdout) == (0, "200")
    finally:
        server.terminate()
        server.wait(timeout=5)


def test_the_server_minimum_is_tls_1_2_and_tls_1_3_is_spoken(
    mtls: MetricsServer,
    tls_files: TlsFiles,  # noqa: F811
) -> None:
    context = mtls.access.context
    assert context is not None
    assert (context.minimum_version, context.maximum_version) == (
        ssl.TLSVersion.TLSv1_2,
        ssl.TLSVersion.TLSv1_3,
    )
    t = tls_files
    client = client_context(t.ca_cert, t.client_cert, t.client_key)
    raw = socket.create_connection(("127.0.0.1", mtls.port), timeout=5)
    with client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        assert conn.version() == "TLSv1.3"


def test_client_allowed_sans_refuses_a_certificate_without_them(
    tmp_path: Path,
    tls_files: TlsFiles,  # noqa: F811
) -> None:
    """tests/tls.py's client certificate has no subjectAltName: it is refused when SANs
    are required, though the CA signed it."""
    t = tls_files
    server = serve(web_config(tmp_path, tls_yml(t) + "  client_allowed_sans: [kmeshd]\n"))
    try:
        with pytest.raises(
            (ConnectionResetError, urllib.error.URLError, httpclient.RemoteDisconnected)
        ):
            get(server.port, client_context(t.ca_cert, t.client_cert, t.client_key))
        assert server._server.rejected == 1
    finally:
        server.close()


# -- basic auth ----------------------------------------------------------------------------


def test_basic_auth_right_password_200_wrong_401_and_the_cache(
    basic: MetricsServer,
    tls_files: TlsFiles,  # noqa: F811
) -> None:
    context = client_context(tls_files.ca_cert)
    auth = basic.access.auth
    assert auth is not None
    assert get(basic.port, context)[0] == 401
    assert get(basic.port, context, basic_header("alice", "wrong"))[0] == 401
    assert get(basic.port, context, basic_header("mallory", "secret"))[0] == 401
    assert auth.checks == 2  # no header: no bcrypt at all
    for _ in range(3):
        status, body = get(basic.port, context, basic_header("alice", "secret"))
        assert status == 200 and OK in body
    assert auth.checks == 3  # the first success checked, the next two from the cache
    assert basic._server.unauthorized == 3


def test_a_401_asks_for_basic_auth(basic: MetricsServer, tls_files: TlsFiles) -> None:  # noqa: F811
    url = f"https://127.0.0.1:{basic.port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=5, context=client_context(tls_files.ca_cert))
    assert e.value.headers["WWW-Authenticate"] == 'Basic realm="kmeshd"'
    assert e.value.read() == b"Unauthorized\n"


def test_curl_with_a_wrong_password_is_refused(basic: MetricsServer, tls_files: TlsFiles) -> None:  # noqa: F811
    ca = ["--cacert", str(tls_files.ca_cert)]
    assert curl(basic.port, *ca, "-u", "alice:wrong").stdout == "401"
    assert curl(basic.port, *ca, "-u", "alice:secret").stdout == "200"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Basic YWxpY2U6c2VjcmV0", ("alice", b"secret")),
        ("basic YWxpY2U6c2VjcmV0", ("alice", b"secret")),
        ("Basic YWxpY2U6OnM=", ("alice", b":s")),  # alice::s: the password holds the colon
        ("Basic YWxpY2U=", None),  # no colon
        ("Basic YWxpY2U6c2VjcmV0!", None),  # not base64
        ("Bearer YWxpY2U6c2VjcmV0", None),
        ("Basic /w==", None),  # 0xff: not UTF-8 as a user name
        ("Basic OnNlY3JldA==", ("", b"secret")),  # an empty user, which no config has
    ],
)
def test_parse_basic(header: str | None, expected: tuple[str, bytes] | None) -> None:
    assert parse_basic(header) == expected


def test_the_cache_is_bounded_and_keeps_the_latest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kmeshd.export.webaccess.CACHE_SIZE", 2)
    users = tuple((f"u{i}", bcrypt.hashpw(b"pw", bcrypt.gensalt(COST))) for i in range(3))
    auth = BasicAuth(users)
    for i in (0, 1, 2, 2, 1):
        assert auth.allows(basic_header(f"u{i}", "pw"))
    assert auth.checks == 3  # u2 and u1 came from the cache
    assert auth.allows(basic_header("u0", "pw"))
    assert auth.checks == 4  # u0 was pushed out by u2


def test_a_nul_in_the_password_is_refused_not_raised() -> None:
    auth = BasicAuth((("alice", ALICE.encode()),))
    assert not auth.allows("Basic " + base64.b64encode(b"alice:sec\0ret").decode())


def test_an_unknown_user_costs_a_bcrypt_check_too() -> None:
    """As long as a known user's check: which names exist cannot be timed."""
    slow = bcrypt.hashpw(b"pw", bcrypt.gensalt(12))
    auth = BasicAuth((("alice", slow),))
    started = time.monotonic()
    assert not auth.allows(basic_header("alice", "nope"))
    known = time.monotonic() - started
    started = time.monotonic()
    assert not auth.allows(basic_header("mallory", "pw"))  # the decoy's password: still no
    unknown = time.monotonic() - started
    assert known > 0.05 and unknown > known / 2


# -- stalled handshakes and crowds ---------------------------------------------------------


def test_a_stalled_handshake_does_not_stop_50_concurrent_scrapes(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tls_files: TlsFiles,  # noqa: F811
) -> None:
    monkeypatch.setattr(http._Handler, "timeout", 1.0)
    t = tls_files
    server = serve(web_config(tmp_path, tls_yml(t)))
    stalled = []
    try:
        for _ in range(3):  # half a ClientHello, then silence; and a client that says nothing
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            stalled.append(sock)
        stalled.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        context = client_context(t.ca_cert, t.client_cert, t.client_key)
        started = time.monotonic()
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda _: get(server.port, context), range(50)))
        assert [status for status, _ in results] == [200] * 50
        assert time.monotonic() - started < 1.0  # not after the stalled ones' timeout
        for sock in stalled:  # each let go after the client timeout
            assert sock.recv(1) == b""
        assert server._server.rejected == 4
    finally:
        for sock in stalled:
            sock.close()
        server.close()


# -- start-up and reload -------------------------------------------------------------------


def test_a_bad_web_config_is_a_config_error_at_start(tmp_path: Path, tls_files: TlsFiles) -> None:  # noqa: F811
    config = web_config(
        tmp_path, tls_yml(tls_files).replace(str(tls_files.server_key), str(tls_files.client_key))
    )
    with pytest.raises(ConfigError) as e:
        open_listener(config)
    assert e.value.problems == [
        f"{tmp_path / 'web.yml'}: tls_server_config.key_file: {tls_files.client_key}:"
        " does not match the certificate (cert_file)"
    ]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda t: ("cert_file: " + str(t.server_cert), "cert_file: /nonexistent.crt"),
            "tls_server_config.cert_file: /nonexistent.crt: does not exist",
        ),
        (
            lambda t: ("cert_file: " + str(t.server_cert), "cert_file: " + str(t.server_key)),
            "tls_server_config.cert_file: {server_key}: holds no PEM certificate",
        ),
        (
            lambda t: ("key_file: " + str(t.server_key), "key_file: " + str(t.server_cert)),
            "tls_server_config.key_file: {server_cert}: holds no PEM private key",
        ),
        (
            lambda t: ("client_ca_file: " + str(t.ca_cert), "client_ca_file: " + str(t.ca_key)),
            "tls_server_config.client_ca_file: {ca_key}: holds no PEM certificate",
        ),
        (
            lambda t: ("client_ca_file: " + str(t.ca_cert), "client_ca_file: /"),
            "tls_server_config.client_ca_file: /: cannot read: Is a directory",
        ),
    ],
)
def test_unusable_files_name_the_key(
    tmp_path: Path,
    tls_files: TlsFiles,  # noqa: F811
    change: object,
    problem: str,
) -> None:
    old, new = change(tls_files)  # type: ignore[operator]
    config = web_config(tmp_path, tls_yml(tls_files).replace(old, new))
    with pytest.raises(ConfigError) as e:
        open_access(config)
    names = {k: v for k, v in vars(tls_files).items()}
    assert e.value.problems == [f"{tmp_path / 'web.yml'}: {problem.format(**names)}"]


def test_an_encrypted_key_is_refused_without_prompting(tmp_path: Path, tls_files: TlsFiles) -> None:  # noqa: F811
    key = tmp_path / "enc.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(tls_files.server_key),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(key),
        ],
        check=True,
    )
    config = web_config(tmp_path, tls_yml(tls_files).replace(str(tls_files.server_key), str(key)))
    with pytest.raises(ConfigError) as e:
        open_access(config)
    assert e.value.problems == [
        f"{tmp_path / 'web.yml'}: tls_server_config.key_file: {key}:"
        " the key is encrypted: decrypt it"
    ]


def test_a_public_address_without_auth_is_warned_about(
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    tls_files: TlsFiles,  # noqa: F811
) -> None:
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="kmeshd"):
        for listen, web in (
            (f"127.0.0.1:{port}", ""),
            (f"0.0.0.0:{port}", tls_yml(tls_files)),
            (f"0.0.0.0:{port}", ""),
        ):
            config = web_config(tmp_path, web)
            config = Config(
                metrics=MetricsConfig(listen=listen, web_config=config.metrics.web_config)
            )
            server = open_listener(config)
            assert server is not None
            server.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"metrics.listen 0.0.0.0:{port} is reachable from other hosts and /metrics asks for neither"
        " a client certificate nor a password: set metrics.web_config (kmeshd(8), SECURITY)"
    ]


def test_a_reload_swaps_certificates_and_users_and_a_bad_file_keeps_them(
    tmp_path: Path,
    tls_files: TlsFiles,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The daemon's SIGHUP path: a rotated server certificate (same path, new CA) and a
    new user take effect on the running listener; a broken file is logged and changes
    nothing."""
    t = tls_files
    host = Host(tmp_path)
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(t.server_cert.read_bytes())
    key.write_bytes(t.server_key.read_bytes())
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    host.write_config(extra="", interval="1s")
    host.config_path.write_text(
        host.config_path.read_text().replace("[accesslog]", f'web_config = "{web}"\n[accesslog]')
    )
    daemon = host.daemon()
    daemon.startup()
    try:
        old_ca, new_ca = client_context(t.ca_cert), client_context(t.wrong_ca_cert)
        assert get(host.port, old_ca)[0] == 200
        cert.write_bytes(t.wrong_server_cert.read_bytes())  # rotated: another CA signed it
        key.write_bytes(t.wrong_server_key.read_bytes())
        web.write_text(web.read_text() + f"basic_auth_users:\n  alice: '{ALICE}'\n")
        daemon.reload()
        with pytest.raises(urllib.error.URLError):
            get(host.port, old_ca)
        assert get(host.port, new_ca)[0] == 401
        assert get(host.port, new_ca, basic_header("alice", "secret"))[0] == 200
        key.write_text("not a key\n")
        with caplog.at_level(logging.ERROR, logger="kmeshd"):
            daemon.reload()
        assert (
            f"reload rejected, keeping the running config: {web}:"
            f" tls_server_config.key_file: {key}: holds no PEM private key" in caplog.text
        )
        assert get(host.port, new_ca, basic_header("alice", "secret"))[0] == 200
    finally:
        daemon.shutdown()
