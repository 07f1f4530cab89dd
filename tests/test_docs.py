"""Man pages and package metadata: built clean, complete, and saying one version."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kmeshd import __version__
from kmeshd.cli import parser
from kmeshd.config import Config, parse_config

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "man"
# man/tidy.py is a script the Makefile runs, not a module of the package.
_spec = importlib.util.spec_from_file_location("tidy", MAN / "tidy.py")
assert _spec is not None and _spec.loader is not None
_tidy_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tidy_module)
tidy = _tidy_module.tidy

PAGES = ["kmeshd.8", "kmeshd.toml.5"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each page built the way the Makefile builds it."""
    if shutil.which("scdoc") is None:
        pytest.skip("scdoc is missing (make host-deps installs it)")
    out = tmp_path_factory.mktemp("man")
    pages = {}
    for page in PAGES:
        roff = subprocess.run(
            ["scdoc"],
            input=(MAN / f"{page}.scd").read_text(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        pages[page] = out / page
        pages[page].write_text("".join(tidy(roff.splitlines(keepends=True))))
    return pages


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_is_clean(built: dict[str, Path], page: str) -> None:
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is missing (make host-deps installs it)")
    lint = subprocess.run(
        ["mandoc", "-Tlint", "-W", "warning", str(built[page])], capture_output=True, text=True
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_man_warnings_are_none(built: dict[str, Path], page: str) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is missing (make host-deps installs man-db)")
    rendered = subprocess.run(
        ["man", "--warnings", "-l", str(built[page])],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "80"},
    )
    assert (rendered.returncode, rendered.stderr) == (0, "")
    assert "SEE ALSO" in rendered.stdout


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([".SH NAME\n", ".P\n", "text\n"], [".SH NAME\n", "text\n"]),  # after a heading
        ([".P\n", ".SH X\n"], [".SH X\n"]),  # before one
        ([".RS 4\n", "a\n", ".P\n", ".RE\n", "b\n"], [".RS 4\n", "a\n", ".RE\n", ".P\n", "b\n"]),
        ([".RS 4\n", "a\n", ".P\n", ".RE\n", ".SH Y\n"], [".RS 4\n", "a\n", ".RE\n", ".SH Y\n"]),
        (["a\n", ".P\n", "b\n"], ["a\n", ".P\n", "b\n"]),  # a real paragraph break stays
        (["a\n", ".P\n"], ["a\n"]),  # at the end
    ],
)
def test_tidy(lines: list[str], expected: list[str]) -> None:
    assert tidy(lines) == expected


def config_keys() -> list[str]:
    """Every key of kmeshd.toml, as section.key."""
    sections = [s.name for s in dataclasses.fields(Config) if s.name != "path"]
    return [
        f"{section}.{f.name}"
        for section in sections
        for f in dataclasses.fields(getattr(Config(), section))
        if not f.name.endswith("_explicit")  # bookkeeping: was the key set in the file
    ]


def test_every_config_key_is_documented() -> None:
    """kmeshd.toml(5) has an entry for each key, under its section."""
    text = (MAN / "kmeshd.toml.5.scd").read_text()
    sections = dict(re.findall(r"^# \[(\w+)\]\n(.*?)(?=^# )", text, flags=re.M | re.S))
    missing = [
        key
        for key in config_keys()
        if f"*{key.split('.')[1]}* (" not in sections.get(key.split(".")[0], "")
    ]
    assert missing == []
    assert len(config_keys()) == 29


def documented(key: str) -> tuple[str, str]:
    """(default, range) of `key` (section.name) as kmeshd.toml(5) lists it."""
    section, name = key.split(".")
    text = (MAN / "kmeshd.toml.5.scd").read_text().split(f"# [{section}]", 1)[1]
    entry = re.search(rf"^\*{name}\* \([^,]+, default (.+?); (.+?)\)$", text, flags=re.M)
    assert entry, key
    return entry[1], entry[2]


@pytest.mark.parametrize("key", config_keys())
def test_each_documented_default_is_the_default(key: str, tmp_path: Path) -> None:
    """The default kmeshd.toml(5) gives a key, written in a file, is the value the daemon
    takes when the key is absent; and a range follows it."""
    section, name = key.split(".")
    default, valid = documented(key)
    written = parse_config(f"[{section}]\n{name} = {default}\n", tmp_path / "k.toml")
    assert getattr(getattr(written, section), name) == getattr(getattr(Config(), section), name)
    assert valid.strip()


def test_every_command_and_accesslog_option_is_documented() -> None:
    text = (MAN / "kmeshd.8.scd").read_text()
    verbs = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(verbs) == {"run", "check-config", "load", "accesslog", "sweep-sockets"}
    for verb in verbs:
        assert f"*{verb}*" in text, verb
    for action in verbs["accesslog"]._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert f"*{option}*" in text, option


def test_one_version_everywhere() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    changelog = (REPO / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert pyproject == __version__
    assert changelog.startswith(f"kmeshd ({__version__}) ")


def test_every_metric_family_is_documented() -> None:
    """kmeshd(8) METRICS names each family a publish exports, every histogram selected
    (kmesh_* families by what follows the level's prefix)."""
    from tests.test_export import Snapshot, render, snapshot

    full = snapshot()
    text = render(Snapshot(full.workload, full.service, full.health))
    names = {f.name for f in text_string_to_metric_families(text)}
    assert len(names) > 30
    page = (MAN / "kmeshd.8").read_text().replace("\\", "")
    for name in names:
        short = name.removeprefix("kmesh_tcp_workload_").removeprefix("kmesh_tcp_")
        short = short.removesuffix("_total") if name.startswith("kmesh_") else name
        assert short in page, name


def test_every_access_log_key_is_documented() -> None:
    """kmeshd(8) ACCESS LOG names each JSON key, and journald's MESSAGE_ID."""
    from kmeshd.accesslog.render import JSON_KEYS, MESSAGE_ID

    text = (MAN / "kmeshd.8.scd").read_text()
    section = text.split("# ACCESS LOG", 1)[1].split("\n# ", 1)[0]
    for key in JSON_KEYS:
        assert f"*{key}*" in section, key
    assert MESSAGE_ID in section


# The keys with a bounded range, and the constants that hold it in kmeshd.config.
RANGES = {
    "kubernetes.kubelet_interval": "KUBELET_INTERVAL_RANGE",
    "metrics.interval": "INTERVAL_RANGE",
    "metrics.series_ttl": "SERIES_TTL_RANGE",
    "metrics.max_series": "MAX_SERIES_RANGE",
    "accesslog.max_rate": "MAX_RATE_RANGE",
    "accesslog.periodic": "PERIODIC_RANGE",
    "bpf.flow_expiry": "FLOW_EXPIRY_RANGE",
    "bpf.max_flows": "MAX_FLOWS_RANGE",
}


@pytest.mark.parametrize("key", RANGES)
def test_each_documented_range_is_the_enforced_range(key: str, tmp_path: Path) -> None:
    """kmeshd.toml(5)'s "low to high" of a key is what the code takes: both bounds are
    valid, and the value each holds is the code's bound."""
    import kmeshd.config

    section, name = key.split(".")
    default, valid = documented(key)
    bounds = re.fullmatch(r"(\S+) to (\S+?)(?:, or \"\")?(?:; _restart_)?", valid)
    assert bounds, valid
    low, high = bounds.groups()
    quoted = default.startswith('"')
    for bound, expected in zip((low, high), getattr(kmeshd.config, RANGES[key]), strict=True):
        written = f'"{bound}"' if quoted else bound
        parsed = parse_config(f"[{section}]\n{name} = {written}\n", tmp_path / "k.toml")
        assert getattr(getattr(parsed, section), name) == expected, bound
