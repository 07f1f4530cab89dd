"""Shared test settings. In CI (CI=true) a test that skips is a failure: a kernel,
journald or consumer test that silently skips there would hide a broken feature."""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from kmeshd.kernel.pins import remove_pins
from tests.daemon_proc import DaemonProcess
from tests.e2e import INVENTORY
from tests.journald import journald  # noqa: F401  (a fixture for every test module)
from tests.netns import Pod, pod_network
from tests.tls import tls_files  # noqa: F401  (TLS certificates for the test servers)

IN_CI = os.environ.get("CI") == "true"

# Property-based tests (tests/test_fuzz_*.py): a fixed budget per test keeps `make check`
# fast and repeatable (derandomized: the same examples each run); `make fuzz` runs the same
# tests with KMESHD_FUZZ=N examples each, random, and prints what each target tried.
settings.register_profile(
    "check", max_examples=150, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("KMESHD_FUZZ") or 0) or 1, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
settings.load_profile("fuzz" if os.environ.get("KMESHD_FUZZ") else "check")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


@pytest.fixture
def pods() -> Iterator[dict[str, Pod]]:
    with pod_network(["client", "server"]) as network:
        yield network


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = Path(f"/sys/fs/bpf/kmeshd-test-{uuid.uuid4().hex[:8]}")
    yield path
    remove_pins(path)  # also detaches a link a killed daemon left pinned


@pytest.fixture
def daemon(tmp_path: Path, pin_dir: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, INVENTORY, pin_dir)
    d.start()
    yield d
    d.close()
