"""kmeshd.identity.kubeconfig and .credentials: finding and using apiserver and kubelet
credentials."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import requests  # type: ignore[import-untyped,unused-ignore]

from kmeshd.errors import ConfigError
from kmeshd.identity.credentials import (
    Credentials,
    TokenSource,
    kubelet_credentials,
    session,
    write_embedded,
)
from kmeshd.identity.kubeconfig import apiserver_credentials, load_kubeconfig, parse_kubeconfig
from tests.k8s_server import TESTDATA

MINIKUBE = TESTDATA / "kubeconfig-minikube-file-paths-k8stream.yaml"
PEM_CA = b"-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n"
PEM_CERT = b"-----BEGIN CERTIFICATE-----\nclient\n-----END CERTIFICATE-----\n"
PEM_KEY = b"-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n"
ENOENT = "No such file or directory"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig(cluster: str, user: str, context: str = "cluster: c\n    user: u") -> str:
    """A one-context kubeconfig; `cluster` and `user` are the bodies, indented by 4."""
    return f"""\
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    {cluster}
contexts:
- name: ctx
  context:
    {context}
current-context: ctx
users:
- name: u
  user:
    {user}
"""


SERVER = "server: https://10.0.0.1:6443"
TOKEN = "token: abc"


def problems(text: str, path: Path, data_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_kubeconfig(text, path, data_dir or path.parent / "data")
    return e.value.problems


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


# --- the real minikube kubeconfig ---------------------------------------------------


def test_minikube_kubeconfig_with_its_files_missing_names_each(tmp_path: Path) -> None:
    """Every missing file is reported at once, with the key that names it."""
    if Path("/home/meson10").exists():
        pytest.skip("this host has the files the kubeconfig names")
    kc = Path(shutil.copy(MINIKUBE, tmp_path / "config"))
    with pytest.raises(ConfigError) as e:
        load_kubeconfig(kc, tmp_path / "data")
    m = "/home/meson10/.minikube"
    assert e.value.problems == [
        f'{kc}: clusters[0].cluster.certificate-authority: cannot read "{m}/ca.crt": {ENOENT}',
        f'{kc}: users[0].user.client-certificate: cannot read "{m}/client.crt": {ENOENT}',
        f'{kc}: users[0].user.client-key: cannot read "{m}/client.key": {ENOENT}',
    ]


def test_minikube_kubeconfig_with_its_files(tmp_path: Path) -> None:
    """The same file, its absolute paths moved under tmp: a client-certificate login."""
    home = tmp_path / "home"
    text = MINIKUBE.read_text().replace("/home/meson10", str(home))
    for name in ("ca.crt", "client.crt", "client.key"):
        write(home / ".minikube" / name, PEM_CA)
    kc = write(tmp_path / "config", text)
    m = home / ".minikube"
    assert load_kubeconfig(kc, tmp_path / "data") == Credentials(
        server="https://192.168.39.150:8443",
        ca_file=m / "ca.crt",
        client_cert=(m / "client.crt", m / "client.key"),
        origin=f"kubeconfig {kc}",
    )
    assert not (tmp_path / "data").exists()  # nothing embedded, nothing written


# --- kubeconfig paths and embedded data ---------------------------------------------


def test_relative_paths_are_relative_to_the_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As kubectl: relative to the file's directory, not the working directory."""
    kube = tmp_path / "kube"
    write(kube / "ca.crt", PEM_CA)
    write(kube / "certs/client.crt", PEM_CERT)
    write(kube / "certs/client.key", PEM_KEY)
    write(kube / "token", "t0k3n\n")
    text = kubeconfig(
        f"{SERVER}\n    certificate-authority: ca.crt",
        "client-certificate: certs/client.crt\n    client-key: ./certs/client.key"
        "\n    tokenFile: token",
    )
    write(kube / "config", text)
    monkeypatch.chdir(tmp_path)  # the kubeconfig named relatively, too
    creds = load_kubeconfig(Path("kube/config"), tmp_path / "data")
    assert (creds.ca_file, creds.client_cert) == (
        kube / "ca.crt",
        (kube / "certs/client.crt", kube / "certs/./client.key"),
    )
    assert creds.token is not None
    assert (creds.token.file, creds.token.current(0.0)) == (kube / "token", "t0k3n")


def test_embedded_data_is_written_to_private_files(tmp_path: Path) -> None:
    """*-data lands in 0600 files in a 0700 directory, even one that existed as 0755."""
    data = tmp_path / "run/kmeshd/credentials"
    data.mkdir(parents=True, mode=0o755)
    data.chmod(0o755)
    text = kubeconfig(
        f"{SERVER}\n    certificate-authority-data: {b64(PEM_CA)}",
        f"client-certificate-data: {b64(PEM_CERT)}\n    client-key-data: {b64(PEM_KEY)}",
    )
    creds = parse_kubeconfig(text, tmp_path / "config", data)
    assert (creds.ca_file, creds.client_cert) == (
        data / "ca.crt",
        (data / "client.crt", data / "client.key"),
    )
    assert list(data.iterdir()) == []  # reading writes nothing: check-config stays harmless
    write_embedded(creds)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name, content in (("ca.crt", PEM_CA), ("client.crt", PEM_CERT), ("client.key", PEM_KEY)):
        assert (data / name).read_bytes() == content
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
    assert sorted(p.name for p in data.iterdir()) == ["ca.crt", "client.crt", "client.key"]


def test_embedded_data_is_not_written_when_the_kubeconfig_has_problems(tmp_path: Path) -> None:
    text = kubeconfig(f"certificate-authority-data: {b64(PEM_CA)}", TOKEN)
    assert problems(text, tmp_path / "config") == [
        f"{tmp_path}/config: clusters[0].cluster.server: is not set"
    ]
    assert not (tmp_path / "data").exists()


def test_token_insecure_and_trailing_slash(tmp_path: Path) -> None:
    text = kubeconfig(
        "server: https://k8s.example.com/proxy/c-1/\n    insecure-skip-tls-verify: true", TOKEN
    )
    creds = parse_kubeconfig(text, tmp_path / "config", tmp_path / "data")
    assert (creds.server, creds.ca_file, creds.insecure) == (
        "https://k8s.example.com/proxy/c-1",
        None,
        True,
    )
    assert creds.token is not None and creds.token.current(0.0) == "abc"


def test_token_file_wins_over_token(tmp_path: Path) -> None:
    """The file is what rotates."""
    write(tmp_path / "tok", "from-file")
    text = kubeconfig(SERVER, f"{TOKEN}\n    tokenFile: {tmp_path}/tok")
    token = parse_kubeconfig(text, tmp_path / "config", tmp_path / "data").token
    assert token is not None and token.current(0.0) == "from-file"


def test_a_user_without_credentials_is_anonymous(tmp_path: Path) -> None:
    text = kubeconfig(SERVER, "{}")
    creds = parse_kubeconfig(text, tmp_path / "config", tmp_path / "data")
    assert (creds.server, creds.token, creds.client_cert) == ("https://10.0.0.1:6443", None, None)


# --- kubeconfig problems ------------------------------------------------------------

UNSUPPORTED = "is not supported; use a token, tokenFile or client certificate"
EXEC_USER = """exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: aws
      args: [eks, get-token]"""


@pytest.mark.parametrize(
    ("cluster", "user", "expected"),
    [
        (SERVER, EXEC_USER, [f"users[0].user: exec credential plugins {UNSUPPORTED}"]),
        (
            SERVER,
            "auth-provider: {name: gcp}",
            [f"users[0].user: auth-provider plugins {UNSUPPORTED}"],
        ),
        (
            SERVER,
            "username: admin\n    password: secret",
            [f"users[0].user: basic authentication (username/password) {UNSUPPORTED}"],
        ),
        (
            "server: 10.0.0.1:6443",
            TOKEN,
            ['clusters[0].cluster.server: "10.0.0.1:6443" is not an https:// URL'],
        ),
        ("server: 5", TOKEN, ["clusters[0].cluster.server: expected a string, got the value 5"]),
        (
            f"{SERVER}\n    insecure-skip-tls-verify: yes please",
            TOKEN,
            [
                "clusters[0].cluster.insecure-skip-tls-verify:"
                ' expected true or false, got the string "yes please"'
            ],
        ),
        (
            f"{SERVER}\n    certificate-authority-data: not*base64",
            TOKEN,
            ["clusters[0].cluster.certificate-authority-data: is not valid base64"],
        ),
        (
            f"{SERVER}\n    certificate-authority-data: {b64(b'plain text')}",
            TOKEN,
            [
                "clusters[0].cluster.certificate-authority-data:"
                ' is not base64 of a PEM file (no "-----BEGIN")'
            ],
        ),
        (
            f"{SERVER}\n    certificate-authority: /ca.crt\n"
            f"    certificate-authority-data: {b64(PEM_CA)}",
            TOKEN,
            [
                "clusters[0].cluster.certificate-authority:"
                " certificate-authority and certificate-authority-data are both set; keep one"
            ],
        ),
        (
            f"{SERVER}\n    certificate-authority-data: {b64(PEM_CA)}"
            "\n    insecure-skip-tls-verify: true",
            TOKEN,
            [
                "clusters[0].cluster.insecure-skip-tls-verify:"
                " cannot be true with a certificate-authority"
            ],
        ),
        (
            SERVER,
            f"client-certificate-data: {b64(PEM_CERT)}",
            ["users[0].user.client-key: is not set, and a client certificate needs it"],
        ),
        (
            SERVER,
            f"client-key-data: {b64(PEM_KEY)}",
            ["users[0].user.client-certificate: is not set, and a client key needs it"],
        ),
        (
            SERVER,
            "tokenFile: /nonexistent/token",
            [f'users[0].user.tokenFile: cannot read "/nonexistent/token": {ENOENT}'],
        ),
        (SERVER, "token: [a, b]", ["users[0].user.token: expected a string, got a list"]),
    ],
)
def test_kubeconfig_problem(tmp_path: Path, cluster: str, user: str, expected: list[str]) -> None:
    kc = tmp_path / "config"
    assert problems(kubeconfig(cluster, user), kc) == [f"{kc}: {line}" for line in expected]


def test_several_problems_are_reported_at_once(tmp_path: Path) -> None:
    kc = tmp_path / "config"
    text = kubeconfig(
        "certificate-authority: missing-ca.crt",
        f"{EXEC_USER}\n    client-certificate: client.crt",
    )
    ca, cert = f'"{tmp_path}/missing-ca.crt"', f'"{tmp_path}/client.crt"'
    assert problems(text, kc) == [
        f"{kc}: clusters[0].cluster.server: is not set",
        f"{kc}: clusters[0].cluster.certificate-authority: cannot read {ca}: {ENOENT}",
        f"{kc}: users[0].user: exec credential plugins {UNSUPPORTED}",
        f"{kc}: users[0].user.client-certificate: cannot read {cert}: {ENOENT}",
        f"{kc}: users[0].user.client-key: is not set, and a client certificate needs it",
    ]


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        (
            "cluster: foo\n    user: bar",
            [
                'contexts[0].context.cluster: "foo" is not one of the clusters (c)',
                'contexts[0].context.user: "bar" is not one of the users (u)',
            ],
        ),
        ("user: u", ["contexts[0].context.cluster: is not set"]),
    ],
)
def test_context_references(tmp_path: Path, context: str, expected: list[str]) -> None:
    kc = tmp_path / "config"
    text = kubeconfig(SERVER, TOKEN, context)
    assert problems(text, kc) == [f"{kc}: {line}" for line in expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "clusters: []\ncontexts: []\nusers: []\n",
            "current-context: is not set (set it, e.g. with kubectl config use-context;"
            " contexts: there are none)",
        ),
        (
            "current-context: prod\ncontexts:\n- name: dev\n  context: {cluster: c, user: u}\n"
            "- name: test\n  context: {cluster: c, user: u}\n",
            'current-context: "prod" is not one of the contexts (dev, test)',
        ),
    ],
)
def test_current_context(tmp_path: Path, text: str, expected: str) -> None:
    kc = tmp_path / "config"
    assert problems(text, kc) == [f"{kc}: {expected}"]


def test_malformed_lists_are_reported_with_the_missing_context(tmp_path: Path) -> None:
    kc = tmp_path / "config"
    text = "clusters: {a: b}\ncontexts:\n- just a string\nusers:\n- name: u\n  user: [1]\n"
    assert problems(text, kc) == [
        f'{kc}: contexts[0]: expected a mapping with a name, got the string "just a string"',
        f"{kc}: clusters: expected a list, got a mapping",
        f"{kc}: users[0].user: expected a mapping, got a list",
        f"{kc}: current-context: is not set (set it, e.g. with kubectl config use-context;"
        " contexts: there are none)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "not a kubeconfig: the file is empty"),
        ("- a\n- b\n", "not a kubeconfig: the file is a list, not a mapping"),
        (
            "clusters:\n- name: c\n  cluster: {server: x\ncontexts: []\n",
            "line 4: expected ',' or '}', but got ':'",
        ),
        ("a: b\n\tc: d\n", "line 2: found character '\\t' that cannot start any token"),
    ],
)
def test_not_a_kubeconfig(tmp_path: Path, text: str, expected: str) -> None:
    kc = tmp_path / "config"
    assert problems(text, kc) == [f"{kc}: {expected}"]


def test_unreadable_kubeconfig_names_who_chose_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_kubeconfig(tmp_path / "nope", tmp_path / "data", "$KUBECONFIG")
    assert e.value.problems == [f"{tmp_path}/nope: cannot read: {ENOENT} (named by $KUBECONFIG)"]


# --- where the credentials come from ------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """A kubeconfig in each place apiserver_credentials() looks, each with its own server."""
    paths = {}
    for name in ("cfg", "env", "env2", "etc"):
        text = kubeconfig(f"server: https://{name}.example:6443", TOKEN)
        paths[name] = write(tmp_path / name / "config", text)
    sa = tmp_path / "sa"
    write(sa / "token", "sa-token\n")
    write(sa / "ca.crt", PEM_CA)
    paths["sa"] = sa
    return paths


IN_POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


@pytest.mark.parametrize(
    ("cfg", "env", "etc_exists", "server"),
    [
        ("cfg", {"KUBECONFIG": "env", **IN_POD}, True, "https://cfg.example:6443"),
        ("", {"KUBECONFIG": "env", **IN_POD}, True, "https://env.example:6443"),
        ("", {"KUBECONFIG": "env:env2", **IN_POD}, True, "https://env.example:6443"),
        ("", {"KUBECONFIG": ":env2:env", **IN_POD}, True, "https://env2.example:6443"),
        ("", {"KUBECONFIG": "", **IN_POD}, True, "https://etc.example:6443"),
        ("", IN_POD, False, "https://10.96.0.1:443"),
    ],
)
def test_search_order(
    roots: dict[str, Path], cfg: str, env: dict[str, str], etc_exists: bool, server: str
) -> None:
    def path(name: str) -> str:
        return str(roots[name]) if name else ""

    if "KUBECONFIG" in env:
        env = {**env, "KUBECONFIG": ":".join(path(n) for n in env["KUBECONFIG"].split(":"))}
    etc = roots["etc"] if etc_exists else roots["etc"].with_name("absent")
    creds = apiserver_credentials(path(cfg), env, etc, roots["sa"], roots["sa"].parent / "data")
    assert creds.server == server


@pytest.mark.parametrize(
    ("host", "server"),
    [("10.96.0.1", "https://10.96.0.1:443"), ("fd00:10:96::1", "https://[fd00:10:96::1]:443")],
)
def test_in_cluster(roots: dict[str, Path], host: str, server: str) -> None:
    env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": "443"}
    sa = roots["sa"]
    creds = apiserver_credentials("", env, sa / "absent", sa, sa / "data")
    assert (creds.server, creds.ca_file, creds.insecure, creds.client_cert) == (
        server,
        sa / "ca.crt",
        False,
        None,
    )
    assert creds.token is not None
    assert (creds.token.file, creds.token.current(0.0)) == (sa / "token", "sa-token")


def test_in_cluster_problems(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "https"}
    with pytest.raises(ConfigError) as e:
        apiserver_credentials("", env, tmp_path / "absent", tmp_path / "sa", tmp_path / "data")
    assert e.value.problems == [
        '$KUBERNETES_SERVICE_PORT: "https" is not a port number',
        f'in-cluster service account: cannot read "{tmp_path}/sa/token": {ENOENT}',
        f'in-cluster service account: cannot read "{tmp_path}/sa/ca.crt": {ENOENT}',
    ]


@pytest.mark.parametrize("env", [{}, {"KUBECONFIG": ""}, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}])
def test_no_credentials_anywhere(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as e:
        apiserver_credentials("", env, tmp_path / "kubeconfig", tmp_path / "sa", tmp_path / "data")
    assert e.value.problems == [
        "kubernetes.kubeconfig: no apiserver credentials: $KUBECONFIG is not set,"
        f" {tmp_path}/kubeconfig does not exist and this is not a pod"
        " (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set);"
        " set kubernetes.kubeconfig, or run in a pod with a service account"
    ]


def test_missing_named_kubeconfig_is_an_error_not_a_fallback(roots: dict[str, Path]) -> None:
    absent = roots["cfg"].with_name("absent")
    with pytest.raises(ConfigError) as e:
        apiserver_credentials(str(absent), IN_POD, roots["etc"], roots["sa"], roots["sa"] / "data")
    assert e.value.problems == [f"{absent}: cannot read: {ENOENT} (named by kubernetes.kubeconfig)"]


# --- token rotation -----------------------------------------------------------------


def test_token_is_reread_after_the_period_not_before(tmp_path: Path) -> None:
    file = write(tmp_path / "token", "one\n")
    token = TokenSource.from_file(file, period=60.0)
    assert token.current(1000.0) == "one"  # the first call starts the clock
    write(file, "two\n")
    assert token.current(1059.9) == "one"
    assert token.current(1060.0) == "two"
    write(file, "three")
    assert token.current(1119.9) == "two"
    assert token.current(1120.0) == "three"


def test_invalidate_forces_a_reread(tmp_path: Path) -> None:
    file = write(tmp_path / "token", "one")
    token = TokenSource.from_file(file)
    assert token.current(5.0) == "one"
    write(file, "two")
    token.invalidate()
    assert token.current(5.0) == "two"
    write(file, "three")
    assert token.current(6.0) == "two"  # one invalidate, one re-read


@pytest.mark.parametrize(
    ("break_it", "warning"),
    [
        (lambda f: f.unlink(), 'cannot read "{f}": No such file or directory'),
        (lambda f: f.write_text(" \n"), '"{f}" is empty'),
        (
            lambda f: (f.unlink(), f.mkdir()),
            '"{f}" is a directory, not a regular file (name a regular file)',
        ),
    ],
)
def test_a_failed_reread_keeps_the_last_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, break_it, warning: str
) -> None:
    file = write(tmp_path / "token", "one")
    token = TokenSource.from_file(file)
    assert token.current(0.0) == "one"
    break_it(file)
    with caplog.at_level(logging.WARNING, logger="kmeshd"):
        assert token.current(60.0) == "one"
        assert token.current(61.0) == "one"  # no retry (and warning) before the next period
    assert caplog.messages == [f"keeping the last token: {warning.format(f=file)}"]
    if file.is_dir():
        file.rmdir()
    write(file, "two")
    assert token.current(120.0) == "two"


def test_static_token_never_rereads() -> None:
    token = TokenSource("abc")
    token.invalidate()
    assert token.current(1e9) == "abc"


def test_repr_never_shows_the_token(tmp_path: Path) -> None:
    file = write(tmp_path / "token", "s3cret")
    creds = Credentials("https://x", token=TokenSource.from_file(file))
    assert "s3cret" not in repr(creds)
    assert repr(TokenSource("s3cret")) == "TokenSource(static)"
    assert repr(creds.token) == f"TokenSource(file='{file}')"


# --- the kubelet --------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Credentials:
    return Credentials(
        "https://10.96.0.1:443",
        tmp_path / "api-ca.crt",
        token=TokenSource("api-token"),
        client_cert=(tmp_path / "c.crt", tmp_path / "c.key"),
        origin="kubeconfig /k",
    )


def test_no_kubelet_url_means_no_kubelet(api: Credentials) -> None:
    assert kubelet_credentials(api, "", "", "") is None


def test_read_only_port_takes_no_credentials(api: Credentials) -> None:
    assert kubelet_credentials(api, "http://127.0.0.1:10255/", "/tok", "/ca") == Credentials(
        "http://127.0.0.1:10255", origin="kubelet read-only port"
    )


def test_kubelet_defaults_to_the_apiserver_credentials(api: Credentials) -> None:
    assert kubelet_credentials(api, "https://127.0.0.1:10250", "", "") == Credentials(
        "https://127.0.0.1:10250",
        api.ca_file,
        token=api.token,
        client_cert=api.client_cert,
        origin="kubelet, kubeconfig /k",
    )


def test_kubelet_token_file_and_ca_replace_the_apiserver_ones(
    api: Credentials, tmp_path: Path
) -> None:
    write(tmp_path / "kubelet-token", "k-token")
    write(tmp_path / "kubelet-ca.crt", PEM_CA)
    creds = kubelet_credentials(
        api, "https://127.0.0.1:10250", f"{tmp_path}/kubelet-token", f"{tmp_path}/kubelet-ca.crt"
    )
    assert creds is not None and creds.token is not None
    assert (creds.ca_file, creds.client_cert, creds.token.current(0.0)) == (
        tmp_path / "kubelet-ca.crt",
        None,
        "k-token",
    )


def test_kubelet_file_problems(api: Credentials, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        kubelet_credentials(api, "https://127.0.0.1:10250", f"{tmp_path}/t", f"{tmp_path}/ca")
    assert e.value.problems == [
        f'kubernetes.kubelet_token_file: cannot read "{tmp_path}/t": {ENOENT}',
        f'kubernetes.kubelet_ca_file: cannot read "{tmp_path}/ca": {ENOENT}',
    ]


@pytest.mark.parametrize(("ca_file", "insecure"), [("", True), ("ca", False)])
def test_kubelet_inherits_insecure_only_with_the_apiserver_ca(
    tmp_path: Path, ca_file: str, insecure: bool
) -> None:
    api = Credentials("https://10.96.0.1", insecure=True)
    ca = str(write(tmp_path / "ca", PEM_CA)) if ca_file else ""
    creds = kubelet_credentials(api, "https://127.0.0.1:10250", "", ca)
    assert creds is not None and creds.insecure is insecure


# --- session ------------------------------------------------------------------------


def prepared(s: requests.Session) -> requests.PreparedRequest:
    return s.prepare_request(requests.Request("GET", "https://10.96.0.1/api"))


def test_session_verifies_authenticates_and_follows_the_token(tmp_path: Path) -> None:
    file = write(tmp_path / "token", "one")
    token = TokenSource.from_file(file)
    creds = Credentials(
        "https://10.96.0.1",
        tmp_path / "ca.crt",
        token=token,
        client_cert=(tmp_path / "c.crt", tmp_path / "c.key"),
    )
    s = session(creds)
    assert (s.verify, s.cert, s.trust_env) == (
        f"{tmp_path}/ca.crt",
        (f"{tmp_path}/c.crt", f"{tmp_path}/c.key"),
        False,
    )
    assert prepared(s).headers["Authorization"] == "Bearer one"
    write(file, "two")
    token.invalidate()  # what the client does after a 401
    assert prepared(s).headers["Authorization"] == "Bearer two"


@pytest.mark.parametrize(
    ("creds", "verify"),
    [
        (Credentials("https://x"), True),
        (Credentials("https://x", insecure=True), False),
        (Credentials("http://x"), True),
    ],
)
def test_session_without_credentials(creds: Credentials, verify: bool) -> None:
    s = session(creds)
    assert (s.verify, s.cert) == (verify, None)
    assert "Authorization" not in prepared(s).headers


# --- hostile input ------------------------------------------------------------------

NO_HEADER = "which no HTTP header can carry (a token is one line of ASCII text)"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"abc\ndef\n", f"the token has a line break at character 4, {NO_HEADER}"),
        ("abc€".encode(), f"the token has U+20AC at character 4, {NO_HEADER}"),
        ("abcé".encode(), f"the token has U+00E9 at character 4, {NO_HEADER}"),
        (b"a\x00b", f"the token has U+0000 at character 2, {NO_HEADER}"),
    ],
)
def test_token_file_that_no_header_can_carry(tmp_path: Path, content: bytes, problem: str) -> None:
    """A token with a line break, a control or a non-ASCII character would fail every
    request: refused up front, naming the file (then check-config and run exit 78)."""
    token = write(tmp_path / "token", content)
    with pytest.raises(ValueError) as e:
        TokenSource.from_file(token)
    assert str(e.value) == f'"{token}": {problem}'


@pytest.mark.parametrize(
    ("special", "problem"),
    [
        ("fifo", "is a FIFO, not a regular file (name a regular file)"),
        ("/dev/zero", "is a character device, not a regular file (name a regular file)"),
    ],
)
def test_special_files_are_refused_without_blocking(
    api: Credentials, tmp_path: Path, special: str, problem: str
) -> None:
    """A FIFO (which would block a read) or /dev/zero (which never ends) as the kubelet's
    token or CA: one problem each, at once."""
    if special == "fifo":
        os.mkfifo(tmp_path / "fifo")
    file = special if special.startswith("/") else f"{tmp_path}/{special}"
    with pytest.raises(ConfigError) as e:
        kubelet_credentials(api, "https://127.0.0.1:10250", file, file)
    assert e.value.problems == [
        f'kubernetes.kubelet_token_file: "{file}" {problem}',
        f'kubernetes.kubelet_ca_file: "{file}" {problem}',
    ]


@pytest.mark.parametrize(
    ("cluster", "user", "expected"),
    [
        (
            "server: https://[::1",
            TOKEN,
            ['clusters[0].cluster.server: "https://[::1" is not an https:// URL: Invalid IPv6 URL'],
        ),
        (
            "server: https://10.0.0.1:99999",
            TOKEN,
            [
                'clusters[0].cluster.server: "https://10.0.0.1:99999" is not an https:// URL:'
                " its port is not a number from 1 to 65535"
            ],
        ),
        (
            f"{SERVER}\n    certificate-authority-data: ÄÖÜ",
            TOKEN,
            ["clusters[0].cluster.certificate-authority-data: is not valid base64"],
        ),
        (
            SERVER,
            'token: "a\\nb"',
            [f"users[0].user.token: the token has a line break at character 2, {NO_HEADER}"],
        ),
        (
            SERVER,
            "tokenFile: /dev/zero",
            [
                'users[0].user.tokenFile: "/dev/zero" is a character device, not a regular file'
                " (name a regular file)"
            ],
        ),
        (
            SERVER,
            'tokenFile: "/a\\0b"',
            [
                'users[0].user.tokenFile: "/a\\u0000b" contains a NUL byte, which no path can'
                " (remove it)"
            ],
        ),
    ],
)
def test_hostile_kubeconfig_values(
    tmp_path: Path, cluster: str, user: str, expected: list[str]
) -> None:
    kc = tmp_path / "config"
    assert problems(kubeconfig(cluster, user), kc) == [f"{kc}: {line}" for line in expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "a: " + "[" * 5000 + "]" * 5000,
            "sequences or mappings are nested too deeply (flatten them)",
        ),
        ("a: " + "9" * 5000, "a number has more than 4300 digits (shorten it)"),
        ("a: 2024-13-45", "not valid: month must be in 1..12"),
        ("a: \x00", "character 4: U+0000 is not allowed in YAML (remove it)"),
    ],
)
def test_yaml_no_parser_survives_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    kc = tmp_path / "config"
    assert problems(text, kc) == [f"{kc.absolute()}: {expected}"]
