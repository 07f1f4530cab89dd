"""Run the real `kmeshd run` as a child process and read what it publishes.

Readiness comes over a real sd_notify socket (NOTIFY_SOCKET), exactly as systemd sees it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kmeshd.config import HISTOGRAMS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


class DaemonProcess:
    """One kmeshd process with its own config, textfile, access log and pin dir."""

    def __init__(
        self,
        workdir: Path,
        inventory: str,
        pin_dir: Path,
        *,
        journald: bool = False,
        max_rate: int | None = 0,
        accesslog_file: bool = True,
        textfile: bool = True,
        interval: str = "200ms",
        kubernetes: str | None = None,
        bpf: str = "",
        accesslog: str = "",
        metrics: str = f"histograms = {list(HISTOGRAMS)}".replace("'", '"'),
    ) -> None:
        """`max_rate` None leaves accesslog.max_rate at its default; `kubernetes`, the body
        of a [kubernetes] table, makes it the identity source instead of `inventory`; `bpf`,
        `accesslog` and `metrics` add lines to their tables (`metrics` exports every
        histogram unless told otherwise)."""
        self.workdir = workdir
        self.pin_dir = pin_dir
        self.port = free_port()
        self.textfile = workdir / "textfile" / "kmeshd.prom"
        self.state_file = workdir / "counters.json.gz"  # metrics.state_file
        self.accesslog = workdir / "log" / "accesslog.json"
        self.accesslog_enabled = accesslog_file
        self.config = workdir / "kmeshd.toml"
        self.textfile.parent.mkdir(exist_ok=True)
        self.accesslog.parent.mkdir(exist_ok=True)
        (workdir / "inventory.toml").write_text(inventory)
        self.config.write_text(
            f"""
[identity]
inventory = "{workdir / "inventory.toml"}"
source = "{"inventory" if kubernetes is None else "kubernetes"}"
[kubernetes]
{kubernetes or ""}
[metrics]
listen = "127.0.0.1:{self.port}"
textfile = "{self.textfile if textfile else ""}"
interval = "{interval}"
state_file = "{self.state_file}"
{metrics}
[accesslog]
file = "{self.accesslog if accesslog_file else ""}"
journald = {"true" if journald else "false"}
{"" if max_rate is None else f"max_rate = {max_rate}"}
{accesslog}
[bpf]
pin_dir = "{pin_dir}"
{bpf}
"""
        )
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_path = workdir / "kmeshd.stderr"
        self.notifications: list[str] = []  # sd_notify messages up to READY=1

    def start(
        self,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        wrapper: Sequence[str] = (),
        until: str = "READY=1",
    ) -> None:
        """Start and wait for READY=1 (or the notification line `until`); `wrapper`
        prefixes the command (e.g. nsenter)."""
        notify_path = self.workdir / f"notify-{time.monotonic_ns()}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify_path.chmod(0o777)  # a daemon run as another user (setpriv) answers too
        notify.settimeout(0.5)
        full_env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": str(notify_path)}
        with self.stderr_path.open("a") as err:
            self.proc = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "kmeshd.cli", "run", "--config", str(self.config)],
                env=full_env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
            )
        try:
            self._wait_ready(notify, timeout, until)
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)

    def _wait_ready(self, notify: socket.socket, timeout: float, until: str) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kmeshd exited {self.proc.returncode}: {self.stderr()}")
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.notifications.append(message)
            if until in message.split("\n"):
                return
        raise TimeoutError(f"kmeshd sent no {until} in {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def samples(self) -> Samples:
        return parse_metrics(self.scrape())

    def wait_for(
        self, check: Callable[[Samples], bool], timeout: float = 15, what: str = ""
    ) -> Samples:
        """Scrape until `check` holds; fail with the last scrape if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.samples()
            if check(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.scrape()}")
            time.sleep(0.1)

    def access_log(self) -> list[dict[str, Any]]:
        if not self.accesslog.exists():
            return []
        lines = self.accesslog.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
