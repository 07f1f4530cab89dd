"""The shipped rules and dashboards on a real Prometheus scraping the real daemon, with
real traffic between network namespaces: every recording rule and every panel's query,
through Prometheus's HTTP API, returns data with the labels the panel shows, and every
template variable lists values. First with every histogram on; then with none and a
`max_series` of 2, so that the overflow label set is among what the panels read."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_proc import DaemonProcess, free_port
from tests.e2e import INVENTORY, run_plan, serve
from tests.netns import Pod, is_root, pod_network
from tests.test_rules import GRAFANA, PROMETHEUS, RECORDS, loaded, panels

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.consumers,
    pytest.mark.skipif(not is_root(), reason="real eBPF needs root"),
]

RATE_INTERVAL = "10s"  # Grafana's $__rate_interval at a 1 s scrape is 4 s; a margin
RANGE = "30s"
ALL = ".*"
# One value of each variable, and two workloads (a multi-value selection) so that the
# workload dashboard's inbound (httpbin's) and outbound (sleep's) panels both have data.
SELECTED = {"cluster": ["Kubernetes"], "namespace": ["default"], "workload": ["httpbin", "sleep"]}
# With the overflow label set: "overflow" selected beside the values that must be there,
# and every other value the variable lists ("+": which label sets a capped level admits
# depends on the order the kernel's flows map hands them over).
WITH_OVERFLOW = {
    "cluster": ["Kubernetes", "overflow"],
    "namespace": ["default", "overflow"],
    "workload": ["httpbin", "overflow", "+"],
}


class Prometheus:
    """A real Prometheus (Debian's), scraping `targets` every second, with kmeshd's rules."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: apt-get install prometheus"
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(PROMETHEUS / "kmeshd-rules.yml"),
                                   str(PROMETHEUS / "kmeshd-alerts.yml")],
                    "scrape_configs": [
                        {"job_name": "kmeshd", "static_configs": [{"targets": targets}]}
                    ],
                }
            )
        )  # fmt: skip
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "prometheus.log").open("w"),
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self._get("/-/ready")
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def _get(self, path: str, **params: str | float) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{params}: {exc.read().decode()}") from exc
        return json.loads(body) if path.startswith("/api/") else body

    def api(self, path: str, **params: str | float) -> Any:
        answer = self._get(f"/api/v1/{path}", **params)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series, each with "values": [(t, "v")]."""
        data = self.api("query", query=expr, time=time.time())
        return [{"metric": s["metric"], "values": [s["value"]]} for s in data["result"]]

    def query_range(self, expr: str, seconds: float = 15) -> list[dict[str, Any]]:
        now = time.time()
        data = self.api("query_range", query=expr, start=now - seconds, end=now, step=1)
        return list(data["result"])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def finite(series: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(v)) for s in series for _t, v in s["values"])


# -- Grafana's side: variables and panel queries, as Grafana would send them --------------


def substitute(text: str, values: dict[str, str]) -> str:
    text = text.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", RANGE)
    return re.sub(r"\$(\w+)", lambda m: values[m[1]], text)


def variable_values(prom: Prometheus, variable: dict[str, Any], values: dict[str, str]) -> set[str]:
    """What Grafana lists for a query variable, the earlier variables set to `values`."""
    query = substitute(variable["query"], values)
    if m := re.fullmatch(r"label_values\((.+), (\w+)\)", query):
        series = prom.api("series", **{"match[]": m[1]}, start=time.time() - 60)
        found = {s[m[2]] for s in series if m[2] in s}
    else:
        m = re.fullmatch(r"query_result\((.+)\)", query, flags=re.S)
        assert m, query
        # Grafana matches the regex against each series as `name{labels} value time`.
        lines = [
            "{" + ",".join(f'{k}="{v}"' for k, v in s["metric"].items()) + "}"
            f" {s['values'][0][1]} {s['values'][0][0]}"
            for s in prom.query(m[1])
        ]
        found = set(lines)
    if variable["regex"]:
        pattern = re.compile(variable["regex"].strip("/"))
        found = {match[1] for line in found if (match := pattern.search(line))}
    return found


def grafana_escape(selected: list[str]) -> str:
    """Selected values as Grafana puts them in a PromQL regex: each escaped for the regex,
    then for the string literal, and several as (a|b)."""
    escaped = [re.escape(value).replace("\\", "\\\\") for value in selected]
    return escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})"


def legend_labels(target: dict[str, Any], kind: str) -> set[str]:
    return {"le"} if kind == "heatmap" else set(re.findall(r"{{(\w+)}}", target["legendFormat"]))


def panel_problems(
    prom: Prometheus, dashboard: dict[str, Any], values: dict[str, str], histograms: bool
) -> list[str]:
    """Every panel query that returns nothing, only NaN, or series without a label its
    legend shows; panels on histograms must return nothing when `histograms` is off."""
    problems = []
    for panel in panels(dashboard):
        needs = "Needs metrics.histograms" in panel["description"]
        for target in panel["targets"]:
            expr = substitute(target["expr"], values)
            series = prom.query(expr) if target["instant"] else prom.query_range(expr)
            where = f"{dashboard['title']}: {panel['title']} [{target['refId']}] {values}"
            if needs and not histograms:
                if series:
                    problems.append(f"{where}: data without the histograms")
                continue
            if not finite(series):
                problems.append(f"{where}: no data")
            for s in series:
                missing = legend_labels(target, panel["type"]) - set(s["metric"])
                if missing:
                    problems.append(f"{where}: a series without {sorted(missing)}")
    return problems


def dashboard_problems(
    prom: Prometheus,
    instance: str,
    histograms: bool,
    selected: dict[str, list[str]] = SELECTED,
) -> list[str]:
    """Each dashboard's variables and panels, at All, and at the `selected` values."""
    problems = []
    for name in ("kmeshd-node.json", "kmeshd-workload.json", "kmeshd-health.json"):
        dashboard = loaded(name)
        variables = dashboard["templating"]["list"][1:]
        chosen = {"instance": [instance], **selected}
        every: dict[str, str] = {}
        one: dict[str, str] = {}
        for v in variables:
            listed = variable_values(prom, v, every)
            wanted = [value for value in chosen[v["name"]] if value != "+"]
            if not set(wanted) <= listed:
                problems.append(f"{name}: ${v['name']} lists {sorted(listed)}")
            if "+" in chosen[v["name"]]:
                wanted = sorted(listed)
            every[v["name"]] = ALL
            one[v["name"]] = grafana_escape(wanted)
        problems += panel_problems(prom, dashboard, every, histograms)
        problems += panel_problems(prom, dashboard, one, histograms)
    return problems


def record_problems(prom: Prometheus, histograms: bool) -> list[str]:
    problems = []
    for rule in RECORDS:
        if "srtt" in rule["record"] and not histograms:
            continue
        if not finite(prom.query(rule["record"])):
            problems.append(f"{rule['record']}: no data")
    for group in prom.api("rules")["groups"]:
        problems += [
            f"{r['name']}: {r['health']} {r.get('lastError')}"
            for r in group["rules"]
            if r["health"] != "ok"
        ]
    return problems


def eventually(check: Callable[[], list[str]], timeout: float) -> list[str]:
    """`check`'s problems once there are none, or the last ones at `timeout`."""
    deadline = time.monotonic() + timeout
    while (problems := check()) and time.monotonic() < deadline:
        time.sleep(2)
    return problems


# -- traffic ---------------------------------------------------------------------------------


class Traffic:
    """Exchanges, resets and refused connects between the pods until stopped: sleep ->
    httpbin, and a client no identity names (stranger) -> httpbin."""

    def __init__(self, pods: dict[str, Pod]) -> None:
        self.pods = pods
        self.stop = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, server, stranger = self.pods["client"], self.pods["server"], self.pods["stranger"]
        try:
            while not self.stop.is_set():
                proc = serve(server, 4)
                run_plan(client, server.ip4, [(292, 5, 0), (1000, 20000, 1), (300, 5, 2)])
                run_plan(stranger, server.ip4, [(50, 5, 0)])
                assert proc.wait(timeout=30) == 0
                client.run(*client.traffic("fail", "--host", server.ip4, "--port", "81"))
                self.rounds += 1
        except BaseException as exc:  # reported by close(), in the test's thread
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert self.error is None, self.error
        assert self.rounds > 0


@pytest.fixture
def pods3() -> Iterator[dict[str, Pod]]:
    with pod_network(["client", "server", "stranger"]) as network:
        yield network


def test_every_rule_and_panel_returns_data_from_a_real_prometheus(
    tmp_path: Path, pin_dir: Path, pods3: dict[str, Pod]
) -> None:
    (tmp_path / "histograms").mkdir()
    (tmp_path / "plain").mkdir()
    full = DaemonProcess(tmp_path / "histograms", INVENTORY, pin_dir)
    plain = DaemonProcess(tmp_path / "plain", INVENTORY, pin_dir, metrics="max_series = 2")
    prom = Prometheus(tmp_path, [f"127.0.0.1:{full.port}", f"127.0.0.1:{plain.port}"])
    traffic = Traffic(pods3)
    try:
        full.start()
        problems = eventually(lambda: record_problems(prom, histograms=True), timeout=60)
        assert problems == []
        problems = eventually(
            lambda: dashboard_problems(prom, f"127.0.0.1:{full.port}", histograms=True), 30
        )
        assert problems == []

        full.stop()
        plain.start()
        instance = f"127.0.0.1:{plain.port}"
        # httpbin, the destination of all traffic, is in an admitted label set whatever
        # the order; the overflow label set (every identity label "overflow") takes the
        # rest: selected beside them, every panel must show data.
        problems = eventually(lambda: dashboard_problems(prom, instance, False, WITH_OVERFLOW), 60)
        assert problems == []
        assert eventually(lambda: record_problems(prom, histograms=False), 10) == []
        overflowed = prom.query(f'kmeshd_series_overflow_total{{instance="{instance}"}}')
        assert sum(float(s["values"][0][1]) for s in overflowed) > 0
        workloads = variable_values(
            prom, loaded("kmeshd-node.json")["templating"]["list"][4],
            {"instance": grafana_escape([instance]), "cluster": ALL, "namespace": ALL},
        )  # fmt: skip
        assert {"overflow", "httpbin"} <= workloads
    finally:
        traffic.close()
        full.close()
        plain.close()
        prom.close()
    assert GRAFANA.is_dir()
