"""Properties of the dashboards' writer (packaging/share/grafana/dashboards.py): any rows
of panels are laid out on Grafana's 24-column grid without overlap, and each template
variable's regex takes exactly the name out of the line Grafana makes of a series, for any
name Kubernetes or the inventory allows, "-" and "overflow" included."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from tests.test_rules import dashboards

widths = st.sampled_from([4, 6, 8, 9, 12, 24]) | st.integers(1, 24)
rows = st.lists(st.lists(widths, min_size=1, max_size=8), min_size=1, max_size=6)


def dashboard_of(layout: list[list[int]]) -> object:
    panel = dashboards.Panel
    return dashboards.Dashboard(
        "uid",
        "title",
        "description",
        tuple(
            dashboards.Row(
                f"row {r}",
                tuple(
                    panel(f"p{r}.{i}", "d", dashboards.t("up", "{{instance}}"), width=w)
                    for i, w in enumerate(row)
                ),
            )
            for r, row in enumerate(layout)
        ),
    )


@given(rows)
def test_panels_never_overlap_and_stay_on_the_grid(layout: list[list[int]]) -> None:
    rendered = dashboards.render(dashboard_of(layout))
    cells: set[tuple[int, int]] = set()
    ids = [p["id"] for p in rendered["panels"]]
    assert ids == list(range(1, len(ids) + 1))
    titles = []
    for p in rendered["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not mine & cells, p["title"]
        cells |= mine
        titles.append((g["y"], g["x"], p["title"]))
    # Read top to bottom, left to right, the panels come in the order they were given.
    assert [t for _y, _x, t in sorted(titles)] == [p["title"] for p in rendered["panels"]]


# DNS-1123 labels (pod, workload and namespace names), an inventory's cluster names, and
# the values kmeshd writes when it knows nothing or has folded a label set.
names = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?", fullmatch=True) | st.sampled_from(
    ["-", "overflow", "Kubernetes"]
)


@given(names, st.sampled_from(["source", "destination"]), st.floats(0, 1e6))
def test_each_variable_takes_exactly_the_name_out_of_a_result_line(
    name: str, end: str, count: float
) -> None:
    for variable, label in (
        ("cluster", "cluster"),
        ("namespace", "workload_namespace"),
        ("workload", "workload"),
    ):
        query, regex = dashboards.VARIABLE_QUERIES[variable]
        assert f"count by ({end}_{label})" in query
        line = f'{{{end}_{label}="{name}"}} {count} 1700000000000'
        found = re.search(regex.strip("/"), line)
        assert found is not None and found[1] == name, (variable, line)
