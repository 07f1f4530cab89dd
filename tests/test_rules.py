"""The Prometheus rules and Grafana dashboards kmeshd ships (packaging/share/): promtool
checks and unit-tests the rules, every alert carries what its reader needs, every panel
says what it shows and asks the datasource variable. The real Prometheus scraping the real
daemon is tests/test_kernel_dashboards.py."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS = REPO / "packaging" / "share" / "prometheus"
GRAFANA = REPO / "packaging" / "share" / "grafana"
RULE_FILES = [PROMETHEUS / "kmeshd-rules.yml", PROMETHEUS / "kmeshd-alerts.yml"]
UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
DS = {"type": "prometheus", "uid": "${datasource}"}

# packaging/share/grafana/dashboards.py writes the dashboards; it is a script of the
# package's data, not a module of kmeshd.
_spec = importlib.util.spec_from_file_location("kmeshd_dashboards", GRAFANA / "dashboards.py")
assert _spec is not None and _spec.loader is not None
dashboards = importlib.util.module_from_spec(_spec)
sys.modules["kmeshd_dashboards"] = dashboards  # its dataclasses look their module up
_spec.loader.exec_module(dashboards)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is missing: apt-get install prometheus")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


def rules(path: Path) -> list[dict[str, Any]]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


ALERTS = rules(PROMETHEUS / "kmeshd-alerts.yml")
RECORDS = rules(PROMETHEUS / "kmeshd-rules.yml")


def loaded(name: str) -> dict[str, Any]:
    return dict(json.loads((GRAFANA / name).read_text()))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_checks_the_rules(path: Path) -> None:
    """`promtool check rules` passes, lint included (no duplicate rules)."""
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("path", UNIT_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(path: Path) -> None:
    result = promtool("test", "rules", str(path))
    assert (result.returncode, result.stdout.split()[-1]) == (0, "SUCCESS"), (
        result.stdout + result.stderr
    )


def unit_tested_alerts() -> dict[str, set[bool]]:
    """alert -> whether its unit tests expect it firing (True), not firing (False)."""
    seen: dict[str, set[bool]] = {}
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                seen.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    return seen


def unit_tested_records() -> set[str]:
    exprs = [
        check["expr"]
        for path in UNIT_TESTS
        for case in yaml.safe_load(path.read_text())["tests"]
        for check in case.get("promql_expr_test", [])
    ]
    return {rule["record"] for rule in RECORDS if any(rule["record"] in e for e in exprs)}


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    assert unit_tested_alerts() == {rule["alert"]: {True, False} for rule in ALERTS}


def test_every_recording_rule_is_unit_tested() -> None:
    assert unit_tested_records() == {rule["record"] for rule in RECORDS}


def test_the_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The unit tests can fail: the same tests on alerts whose failure-ratio threshold
    moved from 5% to 20% do."""
    shutil.copytree(PROMETHEUS, tmp_path / "prometheus")
    alerts = tmp_path / "prometheus" / "kmeshd-alerts.yml"
    text = alerts.read_text()
    assert "connect_failure_ratio:rate5m > 0.05" in text
    alerts.write_text(text.replace("connect_failure_ratio:rate5m > 0.05", "ratio:rate5m > 0.2"))
    result = promtool("test", "rules", str(tmp_path / "prometheus/tests/kmeshd-alerts.test.yml"))
    assert result.returncode == 1
    assert "alertname: KmeshConnectFailureRatioHigh, time: 14m" in result.stderr


def runbooks() -> dict[str, str]:
    """kmeshd(8) ALERTS: alert name -> its runbook paragraph."""
    page = (REPO / "man" / "kmeshd.8.scd").read_text()
    section = page.split("\n# ALERTS\n", 1)[1].split("\n# ", 1)[0]
    return dict(re.findall(r"^\*(\w+)\*\n((?:\t.*\n)+)", section, flags=re.M))


@pytest.mark.parametrize("alert", ALERTS, ids=lambda rule: rule["alert"])
def test_every_alert_has_a_summary_a_description_and_a_runbook(alert: dict[str, Any]) -> None:
    """Each alert says what fired and what it means, and names its runbook: a paragraph of
    kmeshd(8), ALERTS, that says what to do."""
    name = alert["alert"]
    annotations = alert["annotations"]
    assert set(annotations) == {"summary", "description", "runbook"}
    assert annotations["runbook"] == f"kmeshd(8), ALERTS: {name}"
    assert len(annotations["description"]) > len(annotations["summary"]) > 20
    assert alert["labels"]["severity"] in {"info", "warning", "critical"}
    assert len(runbooks().get(name, "")) > 200, name


def test_every_runbook_is_an_alert() -> None:
    assert sorted(runbooks()) == sorted(rule["alert"] for rule in ALERTS)


def test_the_dashboards_are_what_the_script_writes() -> None:
    """packaging/share/grafana/*.json is dashboards.py's output: edit the script, run it."""
    assert sorted(p.name for p in GRAFANA.glob("*.json")) == sorted(dashboards.DASHBOARDS)
    for name, dashboard in dashboards.DASHBOARDS.items():
        assert (GRAFANA / name).read_text() == dashboards.text(dashboard), name


@pytest.mark.parametrize("name", sorted(dashboards.DASHBOARDS))
def test_every_panel_says_what_it_shows_and_asks_the_datasource_variable(name: str) -> None:
    dashboard = loaded(name)
    assert panels(dashboard)
    for panel in panels(dashboard):
        assert len(panel["description"]) > 40, panel["title"]
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS, panel["title"]
            assert target["expr"] and target["legendFormat"], panel["title"]


@pytest.mark.parametrize("name", sorted(dashboards.DASHBOARDS))
def test_the_variables_default_to_all_and_list_through_the_datasource(name: str) -> None:
    """A datasource variable, then query variables that default to All (".*"), so that
    panels show data with the labels kmeshd exports by default."""
    variables = loaded(name)["templating"]["list"]
    assert variables[0] == dashboards.DATASOURCE_VARIABLE
    assert variables[0]["query"] == "prometheus"
    for v in variables[1:]:
        assert (v["type"], v["datasource"], v["includeAll"], v["allValue"]) == (
            "query", DS, True, ".*",
        )  # fmt: skip
        assert v["current"]["value"] == ["$__all"]
        assert v["query"].startswith(("label_values(", "query_result(")), v["name"]


def test_every_variable_a_panel_uses_is_defined() -> None:
    for name in dashboards.DASHBOARDS:
        dashboard = loaded(name)
        defined = {v["name"] for v in dashboard["templating"]["list"]}
        text = json.dumps(panels(dashboard)) + json.dumps(dashboard["templating"])
        used = set(re.findall(r"\$(\w+)", text)) - {"__rate_interval", "__range", "__all"}
        assert used <= defined, (name, used - defined)


@pytest.mark.parametrize(
    ("histograms", "description"),
    [
        (("srtt",), 'Needs metrics.histograms = ["srtt"] in kmeshd.toml'),
        (("duration",), 'Needs metrics.histograms = ["duration"] in kmeshd.toml'),
        (("connect",), 'Needs metrics.histograms = ["connect"] in kmeshd.toml'),
    ],
)
def test_panels_on_histograms_say_which_they_need(
    histograms: tuple[str, ...], description: str
) -> None:
    needing = [
        p
        for d in dashboards.DASHBOARDS.values()
        for row in d.rows
        for p in row.panels
        if p.histograms == histograms
    ]
    assert needing
    for panel in needing:
        assert description in panel.description, panel.title
    for d in dashboards.DASHBOARDS.values():
        for row in d.rows:
            for p in row.panels:
                uses = any("_seconds_bucket" in t.expr for t in p.targets)
                assert uses == bool(p.histograms), p.title
