"""A real Prometheus (Debian's /usr/bin/prometheus) scraping the real daemon over TLS: with
a client certificate, then, after a SIGHUP that swaps metrics.web_config's file, with
basic auth; curl without a certificate, from another CA, with TLS 1.1 and with a wrong
password is refused."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from tests.daemon_proc import DaemonProcess, free_port
from tests.e2e import INVENTORY
from tests.netns import is_root
from tests.tls import TlsFiles, tls_files  # noqa: F401

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.consumers,
    pytest.mark.skipif(not is_root(), reason="real eBPF needs root"),
]

TLS_1_1_CLIENT = ["--tlsv1.1", "--tls-max", "1.1", "--ciphers", "DEFAULT:@SECLEVEL=0"]


def mtls_yml(t: TlsFiles) -> str:
    return (
        f"tls_server_config:\n  cert_file: {t.server_cert}\n  key_file: {t.server_key}\n"
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {t.ca_cert}\n"
    )


def basic_yml(t: TlsFiles) -> str:
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(10)).decode()
    return (
        f"tls_server_config:\n  cert_file: {t.server_cert}\n  key_file: {t.server_key}\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )


def prometheus_yml(t: TlsFiles, target: str) -> str:
    """Two jobs on the same target: one proves itself with a certificate, one with a
    password; whichever the daemon's web config asks for is up, the other down."""
    static = f"    static_configs: [{{targets: ['{target}']}}]\n"
    return (
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: mtls\n    scheme: https\n"
        f"    tls_config: {{ca_file: {t.ca_cert}, cert_file: {t.client_cert},"
        f" key_file: {t.client_key}}}\n" + static + "  - job_name: basic\n    scheme: https\n"
        f"    tls_config: {{ca_file: {t.ca_cert}}}\n"
        "    basic_auth: {username: prometheus, password: secret}\n" + static
    )


class Prometheus:
    def __init__(self, workdir: Path, config: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "apt-get install prometheus"
        (workdir / "prometheus.yml").write_text(config)
        self.port = free_port()
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **query: str) -> object:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())["data"]

    def health(self) -> dict[str, tuple[str, str]]:
        """job -> (health, lastError) of each active target."""
        try:
            data = self.api("targets", state="active")
        except OSError:
            return {}  # not listening yet
        assert isinstance(data, dict)
        return {t["labels"]["job"]: (t["health"], t["lastError"]) for t in data["activeTargets"]}

    def wait_health(self, want: dict[str, str], timeout: float = 30) -> dict[str, tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            seen = self.health()
            if {job: h for job, (h, _) in seen.items()} == want:
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"targets never {want}: {seen}")
            time.sleep(0.25)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def tls_daemon(
    tmp_path: Path,
    pin_dir: Path,
    tls_files: TlsFiles,  # noqa: F811
) -> Iterator[tuple[DaemonProcess, Path]]:
    web = tmp_path / "web.yml"
    web.write_text(mtls_yml(tls_files))
    daemon = DaemonProcess(tmp_path, INVENTORY, pin_dir, metrics=f'web_config = "{web}"')
    daemon.start()
    yield daemon, web
    daemon.close()


def curl(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"https://127.0.0.1:{port}/metrics"
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
    return subprocess.run([*command, *args, url], capture_output=True, text=True, check=False)


def test_prometheus_scrapes_with_a_client_certificate_then_with_basic_auth(
    tls_daemon: tuple[DaemonProcess, Path],
    tls_files: TlsFiles,  # noqa: F811
    tmp_path: Path,
) -> None:
    daemon, web = tls_daemon
    t = tls_files
    prometheus = Prometheus(tmp_path, prometheus_yml(t, f"127.0.0.1:{daemon.port}"))
    try:
        seen = prometheus.wait_health({"mtls": "up", "basic": "down"})
        assert "tls" in seen["basic"][1].lower()  # no certificate: the handshake fails
        result = prometheus.api("query", query='kmeshd_build_info{job="mtls"}')
        assert isinstance(result, dict) and len(result["result"]) == 1
        assert result["result"][0]["value"][1] == "1"

        ca, cert = ["--cacert", str(t.ca_cert)], ["--cert", str(t.client_cert)]
        key = ["--key", str(t.client_key)]
        assert curl(daemon.port, *ca, *cert, *key).stdout == "200"
        for refused in (
            curl(daemon.port, *ca),  # no certificate
            curl(
                daemon.port,
                *ca,
                "--cert",
                str(t.wrong_client_cert),
                "--key",
                str(t.wrong_client_key),
            ),
            curl(daemon.port, "-k", *TLS_1_1_CLIENT, *cert, *key),
        ):
            assert refused.stdout == "000" and refused.returncode in (35, 55, 56), refused.stderr

        web.write_text(basic_yml(t))
        daemon.send(signal.SIGHUP)
        seen = prometheus.wait_health({"mtls": "down", "basic": "up"})
        assert "401" in seen["mtls"][1]
        result = prometheus.api("query", query='kmeshd_build_info{job="basic"}')
        assert isinstance(result, dict) and len(result["result"]) == 1
        assert curl(daemon.port, *ca, "-u", "prometheus:wrong").stdout == "401"
        assert curl(daemon.port, *ca, "-u", "prometheus:secret").stdout == "200"
    finally:
        prometheus.close()
    assert "reload rejected" not in daemon.stderr()
