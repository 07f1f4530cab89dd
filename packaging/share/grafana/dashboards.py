#!/usr/bin/env python3
"""kmeshd's Grafana dashboards, written as the provisioning-ready JSON files beside this
script: `python3 packaging/share/grafana/dashboards.py` rewrites them (tests/test_rules.py
fails while they differ from what it writes).

Each panel queries the data source that the `datasource` variable names. The cluster,
namespace and workload variables list the values of either end of a connection and
default to All, whose value is ".*", so every panel shows data with the labels kmeshd
exports by default, the overflow label set (identity labels "overflow") and unknown ends
("-") included.

A connection between two monitored ends is reported twice, by its source (connecting)
and its destination (accepting) socket, with the same bytes. Panels by peer take the
larger of the two reporters' figures, so each connection counts once whether one end or
both are monitored; node panels split by reporter instead.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
W = "kmesh_tcp_workload_"
RATE = "$__rate_interval"

# The selected workload as either end, as the destination, as the source.
SRC = (
    'instance=~"$instance",source_cluster=~"$cluster",'
    'source_workload_namespace=~"$namespace",source_workload=~"$workload"'
)
DST = (
    'instance=~"$instance",destination_cluster=~"$cluster",'
    'destination_workload_namespace=~"$namespace",destination_workload=~"$workload"'
)
SOURCE_PEER = "source_workload_namespace, source_workload"
DESTINATION_PEER = "destination_workload_namespace, destination_workload"
PAIR = f"{SOURCE_PEER}, {DESTINATION_PEER}"
HISTOGRAMS_NOTE = ' Needs metrics.histograms = ["{}"] in kmeshd.toml; empty without it.'


def either(metric: str, rate: bool = True) -> str:
    """`metric` of label sets with the selected workload at either end (a set with both
    is taken once: `or` keeps the left one)."""
    if rate:
        return f"(rate({metric}{{{SRC}}}[{RATE}]) or rate({metric}{{{DST}}}[{RATE}]))"
    return f"({metric}{{{SRC}}} or {metric}{{{DST}}})"


def own(metric: str) -> str:
    """Rate of `metric` as the selected workload's own sockets count it: as the source
    when it connects, as the destination when it accepts."""
    return (
        f'(rate({metric}{{reporter="source",{SRC}}}[{RATE}])'
        f' or rate({metric}{{reporter="destination",{DST}}}[{RATE}]))'
    )


def once(by: str, expr: str) -> str:
    """Sum `expr` by `by`, each connection once: the larger reporter's figure."""
    return f"max by ({by}) (sum by ({by}, reporter) ({expr}))"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str
    instant: bool = False  # a table's query: one value per series, at the range's end


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "heatmap", "table"
    histograms: tuple[str, ...] = ()  # metrics.histograms the panel needs
    width: int = 12


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[str, ...] = ("instance", "cluster", "namespace", "workload")
    tags: tuple[str, ...] = field(default=("kmeshd",))


def t(expr: str, legend: str, instant: bool = False) -> tuple[Target, ...]:
    return (Target(expr, legend, instant),)


# -- variables ---------------------------------------------------------------------------

OPENED = f"{W}connections_opened_total"


def _either_end(label: str, selected: str, regex: str) -> tuple[str, str]:
    """A query_result listing `label`'s values at either end (`selected` filters further,
    with {end} for the end), and the regex that takes each value out of a result line
    such as `{source_workload="sleep"} 1 1700000000000`."""

    def end(side: str) -> str:
        match = f'instance=~"$instance"{selected.format(end=side)}'
        return f"count by ({side}_{label}) ({OPENED}{{{match}}})"

    return f"query_result({end('source')} or {end('destination')})", regex


VARIABLE_QUERIES: dict[str, tuple[str, str]] = {
    "instance": ("label_values(kmeshd_build_info, instance)", ""),
    "cluster": _either_end("cluster", "", '/_cluster="([^"]*)"/'),
    "namespace": _either_end(
        "workload_namespace", ',{end}_cluster=~"$cluster"', '/_namespace="([^"]*)"/'
    ),
    "workload": _either_end(
        "workload",
        ',{end}_cluster=~"$cluster",{end}_workload_namespace=~"$namespace"',
        '/_workload="([^"]*)"/',
    ),
}
VARIABLE_LABELS = {
    "instance": "Node",
    "cluster": "Cluster",
    "namespace": "Namespace",
    "workload": "Workload",
}


def variable(name: str) -> dict[str, Any]:
    query, regex = VARIABLE_QUERIES[name]
    return {
        "name": name,
        "label": VARIABLE_LABELS[name],
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": query,  # the classic string form: every Grafana version reads it
        "regex": regex,
        "refresh": 2,  # on each time range change: pods come and go
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",  # not a list of every value: stays short, matches "-" and "overflow"
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
    }


DATASOURCE_VARIABLE = {
    "name": "datasource",
    "label": "Data source",
    "type": "datasource",
    "query": "prometheus",
    "current": {},
    "options": [],
    "refresh": 1,
    "regex": "",
    "hide": 0,
}


# -- the dashboards ------------------------------------------------------------------------

NODE = Dashboard(
    "kmeshd-node",
    "kmeshd / Node overview",
    "TCP traffic the selected nodes' kmeshd saw: connections, bytes, open connections,"
    " failures, the busiest workload pairs. A workload selection matches either end.",
    (
        Row(
            "Traffic",
            (
                Panel(
                    "Connections opened and closed per second",
                    "TCP connections opened and closed a second, by reporter: source counts"
                    " connecting sockets (outbound), destination accepting ones (inbound). A"
                    " connection between two pods of one node counts under both. Failed connects"
                    " are not opened: see the failures panel.",
                    (
                        Target(
                            f"sum by (reporter) ({either(W + 'connections_opened_total')})",
                            "opened, {{reporter}}",
                        ),
                        Target(
                            f"sum by (reporter) ({either(W + 'connections_closed_total')})",
                            "closed, {{reporter}}",
                        ),
                    ),
                    unit="cps",
                ),
                Panel(
                    "Bytes per second",
                    "Application bytes a second, by reporter: request bytes are those the"
                    " destination received, response bytes those it sent (Istio's received and"
                    " sent). Open connections' bytes count as they are acknowledged.",
                    (
                        Target(
                            f"sum by (reporter) ({either(W + 'received_bytes_total')})",
                            "request, {{reporter}}",
                        ),
                        Target(
                            f"sum by (reporter) ({either(W + 'sent_bytes_total')})",
                            "response, {{reporter}}",
                        ),
                    ),
                    unit="Bps",
                ),
                Panel(
                    "Connections open now",
                    "Established connections open at each publish, by reporter (the sockets"
                    " kmeshd tracks on the node).",
                    t(
                        f"sum by (reporter) ({either(W + 'connections_active', rate=False)})",
                        "{{reporter}}",
                    ),
                ),
                Panel(
                    "Connect failures per second, by reason",
                    "Connects that never established, a second, by reason: refused (a reset"
                    " answered the SYN), timeout (the SYN was never answered), other. Counted by"
                    " the connecting socket only; empty while no connect failed.",
                    t(
                        f"sum by (reason) ({either(W + 'connect_failures_total')})",
                        "{{reason}}",
                    ),
                    unit="cps",
                ),
            ),
        ),
        Row(
            "Workloads",
            (
                Panel(
                    "Top talkers",
                    "The ten workload pairs that moved the most bytes (both directions) a second"
                    " over the dashboard's time range; each connection counted once.",
                    t(
                        "topk(10, "
                        + once(
                            PAIR,
                            f"{either(W + 'received_bytes_total')}"
                            f" + {either(W + 'sent_bytes_total')}",
                        ).replace(RATE, "$__range")
                        + ")",
                        "{{source_workload}}.{{source_workload_namespace}} →"
                        " {{destination_workload}}.{{destination_workload_namespace}}",
                        instant=True,
                    ),
                    unit="Bps",
                    kind="table",
                ),
                Panel(
                    "Unattributed connections per second",
                    "Connections neither of whose ends is a known workload or service, a second"
                    " (kmeshd_connections_unattributed_total): in no kmesh_ series. Not filtered"
                    " by cluster, namespace or workload.",
                    t(
                        "sum by (instance) (rate(kmeshd_connections_unattributed_total"
                        f'{{instance=~"$instance"}}[{RATE}]))',
                        "{{instance}}",
                    ),
                    unit="cps",
                ),
            ),
        ),
    ),
)


def _by_peer(direction: str) -> tuple[str, str, str]:
    """(selector, peer labels, legend) of the selected workload's inbound or outbound."""
    if direction == "inbound":
        return DST, SOURCE_PEER, "{{source_workload}}.{{source_workload_namespace}}"
    return SRC, DESTINATION_PEER, "{{destination_workload}}.{{destination_workload_namespace}}"


def _peer_row(direction: str) -> Row:
    sel, peer, legend = _by_peer(direction)
    side = "destination" if direction == "inbound" else "source"
    other = "source" if direction == "inbound" else "destination"
    who = f"the selected workloads as the {side}, by {other} workload"
    panels = [
        Panel(
            f"{direction.capitalize()} connections opened per second",
            f"TCP connections opened a second {'to' if direction == 'inbound' else 'from'}"
            f" {who}; each connection counted once.",
            t(once(peer, f"rate({W}connections_opened_total{{{sel}}}[{RATE}])"), legend),
            unit="cps",
        ),
        Panel(
            f"{direction.capitalize()} bytes per second",
            f"Application bytes a second with {who}: request bytes (received by the"
            " destination) and response bytes (sent by it); each connection counted once.",
            (
                Target(
                    once(peer, f"rate({W}received_bytes_total{{{sel}}}[{RATE}])"),
                    legend + " request",
                ),
                Target(
                    once(peer, f"rate({W}sent_bytes_total{{{sel}}}[{RATE}])"),
                    legend + " response",
                ),
            ),
            unit="Bps",
        ),
        Panel(
            f"{direction.capitalize()} connections open now",
            f"Established connections open at each publish with {who}.",
            t(once(peer, f"{W}connections_active{{{sel}}}"), legend),
        ),
    ]
    if direction == "outbound":
        panels.append(
            Panel(
                "Outbound connect failures per second",
                "Connects from the selected workloads that never established, a second, by"
                " destination workload and reason (refused, timeout, other); empty while"
                " none failed.",
                t(
                    f"sum by ({peer}, reason) (rate({W}connect_failures_total"
                    f'{{reporter="source",{sel}}}[{RATE}]))',
                    legend + " {{reason}}",
                ),
                unit="cps",
            )
        )
    return Row(f"{direction.capitalize()}: {who}", tuple(panels))


def _heatmap(title: str, family: str, histogram: str, what: str) -> Panel:
    return Panel(
        title,
        what + HISTOGRAMS_NOTE.format(histogram),
        t(f"sum by (le) ({own(W + family + '_bucket')})", "{{le}}"),
        unit="s",
        kind="heatmap",
        histograms=(histogram,),
    )


WORKLOAD = Dashboard(
    "kmeshd-workload",
    "kmeshd / Workload",
    "One workload's TCP traffic (or all selected): inbound and outbound by peer, RTT,"
    " connection and handshake times from kmeshd's histograms, retransmits, losses, resets.",
    (
        _peer_row("inbound"),
        _peer_row("outbound"),
        Row(
            "Latency",
            (
                _heatmap(
                    "Smoothed RTT at close",
                    "srtt_seconds",
                    "srtt",
                    "How many connections a second closed with each smoothed RTT, as the"
                    " selected workloads' own sockets measured it (the connecting socket for"
                    " outbound connections, the accepting one for inbound).",
                ),
                _heatmap(
                    "Connection duration",
                    "connection_duration_seconds",
                    "duration",
                    "How many connections a second closed after each duration (establishment"
                    " to close), as the selected workloads' own sockets saw it.",
                ),
                Panel(
                    "Handshake time, p50 and p99, by destination",
                    "Connect() to established of the selected workloads' outbound connections,"
                    " 50th and 99th percentile over the rate interval, by destination workload."
                    + HISTOGRAMS_NOTE.format("connect"),
                    tuple(
                        Target(
                            f"histogram_quantile({q}, sum by (le, {DESTINATION_PEER}) (rate("
                            f'{W}connect_duration_seconds_bucket{{reporter="source",{SRC}}}'
                            f"[{RATE}])))",
                            f"p{round(q * 100)} "
                            "{{destination_workload}}.{{destination_workload_namespace}}",
                        )
                        for q in (0.5, 0.99)
                    ),
                    unit="s",
                    histograms=("connect",),
                ),
                Panel(
                    "Smoothed RTT p99 by peer",
                    "99th percentile of the smoothed RTT at close, over the rate interval, of"
                    " the selected workloads' own sockets, by the workload at the other end."
                    + HISTOGRAMS_NOTE.format("srtt"),
                    (
                        Target(
                            f"histogram_quantile(0.99, sum by (le, {DESTINATION_PEER}) (rate("
                            f'{W}srtt_seconds_bucket{{reporter="source",{SRC}}}[{RATE}])))',
                            "to {{destination_workload}}.{{destination_workload_namespace}}",
                        ),
                        Target(
                            f"histogram_quantile(0.99, sum by (le, {SOURCE_PEER}) (rate("
                            f'{W}srtt_seconds_bucket{{reporter="destination",{DST}}}[{RATE}])))',
                            "from {{source_workload}}.{{source_workload_namespace}}",
                        ),
                    ),
                    unit="s",
                    histograms=("srtt",),
                ),
            ),
        ),
        Row(
            "Retransmits, losses and resets",
            (
                Panel(
                    "Retransmitted and lost segments per second",
                    "Segments the selected workloads' own sockets retransmitted a second, and"
                    " those of them lost (not shown spurious by a D-SACK), by reporter.",
                    (
                        Target(
                            f"sum by (reporter) ({own(W + 'retransmits_total')})",
                            "retransmitted, {{reporter}}",
                        ),
                        Target(
                            f"sum by (reporter) ({own(W + 'packets_lost_total')})",
                            "lost, {{reporter}}",
                        ),
                    ),
                ),
                Panel(
                    "Connections reset per second",
                    "Established connections of the selected workloads ended by a reset their"
                    " own socket received, a second, by reporter (source: the workload"
                    " connected; destination: it accepted).",
                    t(
                        f"sum by (reporter) ({own(W + 'connections_reset_total')})",
                        "{{reporter}}",
                    ),
                    unit="cps",
                ),
            ),
        ),
    ),
)


def _health(metric: str, extra: str = "") -> str:
    return f'{metric}{{instance=~"$instance"{extra}}}'


def _health_rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({_health(metric)}[{RATE}]))"


HEALTH = Dashboard(
    "kmeshd-health",
    "kmeshd / Health",
    "kmeshd's own health on the selected nodes: publishes, events, access-log losses, sinks,"
    " identity sources, BPF maps, label sets, failures survived. Each alert of"
    " kmeshd-alerts.yml has a panel here.",
    (
        Row(
            "Publishing",
            (
                Panel(
                    "Version",
                    "The kmeshd version each node runs (kmeshd_build_info).",
                    t(_health("kmeshd_build_info"), "{{instance}} {{version}}", instant=True),
                    kind="table",
                    width=6,
                ),
                Panel(
                    "Age of the published metrics",
                    "How old the metrics were when scraped (scrape time less the last publish),"
                    " against three publish intervals: KmeshdNotPublishing fires above it.",
                    (
                        Target(
                            f"timestamp({_health('kmeshd_last_publish_timestamp_seconds')})"
                            f" - {_health('kmeshd_last_publish_timestamp_seconds')}",
                            "age {{instance}}",
                        ),
                        Target(
                            f"3 * {_health('kmeshd_publish_interval_seconds')}",
                            "alert threshold {{instance}}",
                        ),
                    ),
                    unit="s",
                    width=9,
                ),
                Panel(
                    "Publish and textfile write time",
                    "How long the last publish took (the socket sweep, reading the kernel's"
                    " flows, rendering), and the last textfile write within it.",
                    (
                        Target(_health("kmeshd_publish_duration_seconds"), "publish {{instance}}"),
                        Target(
                            _health("kmeshd_textfile_write_duration_seconds"),
                            "textfile {{instance}}",
                        ),
                    ),
                    unit="s",
                    width=9,
                ),
            ),
        ),
        Row(
            "Events and the access log",
            (
                Panel(
                    "Events per second, by kind",
                    "TCP events of sockets with a known end the probe saw a second: opened,"
                    " closed, failed.",
                    t(
                        _health_rate("kmeshd_events_total", "instance, kind"),
                        "{{kind}} {{instance}}",
                    ),
                    unit="cps",
                ),
                Panel(
                    "Access-log records lost per second",
                    "Records the kernel could not queue (ring buffer full:"
                    " KmeshdAccessLogRecordsLost), records a sink could not take, by sink, and"
                    " records no access-log record could be made of. Metrics are not affected.",
                    (
                        Target(
                            _health_rate("kmeshd_events_lost_total", "instance"),
                            "ring buffer full {{instance}}",
                        ),
                        Target(
                            _health_rate(
                                "kmeshd_accesslog_records_dropped_total", "instance, sink"
                            ),
                            "dropped by {{sink}} {{instance}}",
                        ),
                        Target(
                            _health_rate("kmeshd_accesslog_records_failed_total", "instance"),
                            "unreadable {{instance}}",
                        ),
                    ),
                ),
                Panel(
                    "Sinks up",
                    "1 while a sink (file, journald, textfile) works, 0 while it fails"
                    " (KmeshdSinkDown after 2 minutes).",
                    t(_health("kmeshd_sink_up"), "{{sink}} {{instance}}"),
                    width=6,
                ),
                Panel(
                    "Textfile write failures per second",
                    "Publishes whose node-exporter textfile could not be written"
                    " (KmeshdTextfileWriteFailures); node-exporter keeps serving the last one.",
                    t(
                        _health_rate("kmeshd_textfile_write_failures_total", "instance"),
                        "{{instance}}",
                    ),
                    width=6,
                ),
            ),
        ),
        Row(
            "Identities, maps and label sets",
            (
                Panel(
                    "Identity sources up",
                    "1 while an identity source's last sync succeeded (inventory, kubelet,"
                    " apiserver), else 0 (KmeshdIdentitySourceDown after 5 minutes).",
                    t(_health("kmeshd_identity_source_up"), "{{source}} {{instance}}"),
                    width=6,
                ),
                Panel(
                    "BPF map entries refused per second",
                    "Entries a BPF map refused because it was full, by map (KmeshdBPFMapFull):"
                    " flows (uncounted connections), sockets, known_addrs.",
                    t(
                        _health_rate("kmeshd_bpf_map_full_total", "instance, map"),
                        "{{map}} {{instance}}",
                    ),
                    width=6,
                ),
                Panel(
                    "Flows map occupancy",
                    "Entries in the kernel's flows map over its capacity, at each publish.",
                    t(
                        f"{_health('kmeshd_bpf_map_entries')}"
                        f" / {_health('kmeshd_bpf_map_capacity')}",
                        "{{map}} {{instance}}",
                    ),
                    unit="percentunit",
                    width=6,
                ),
                Panel(
                    "Label sets, by level",
                    "Label sets exported now at the workload and service levels, the overflow"
                    " label set included.",
                    t(_health("kmeshd_series"), "{{level}} {{instance}}"),
                    width=6,
                ),
                Panel(
                    "Label sets overflowed and expired per second",
                    "New label sets folded into the overflow label set because the level held"
                    " metrics.max_series (KmeshdSeriesOverflow), and label sets that expired"
                    " (metrics.series_ttl).",
                    (
                        Target(
                            _health_rate("kmeshd_series_overflow_total", "instance, level"),
                            "overflowed {{level}} {{instance}}",
                        ),
                        Target(
                            _health_rate("kmeshd_series_expired_total", "instance"),
                            "expired {{instance}}",
                        ),
                    ),
                ),
                Panel(
                    "Unattributed connections per second",
                    "Connections neither of whose ends is a known workload or service: in no"
                    " kmesh_ series. A jump after a deployment can mean identities are missing.",
                    t(
                        _health_rate("kmeshd_connections_unattributed_total", "instance"),
                        "{{instance}}",
                    ),
                    unit="cps",
                ),
            ),
        ),
        Row(
            "Failures survived",
            (
                Panel(
                    "Failures survived per second",
                    "Publishes that raised, main-loop steps that raised (by step), threads"
                    " restarted (by thread), and /metrics connections refused while 64 were"
                    " served. Each is also logged.",
                    (
                        Target(
                            _health_rate("kmeshd_publish_errors_total", "instance"),
                            "publish {{instance}}",
                        ),
                        Target(
                            _health_rate("kmeshd_loop_errors_total", "instance, step"),
                            "{{step}} {{instance}}",
                        ),
                        Target(
                            _health_rate("kmeshd_thread_restarts_total", "instance, thread"),
                            "{{thread}} restarted {{instance}}",
                        ),
                        Target(
                            _health_rate("kmeshd_http_connections_refused_total", "instance"),
                            "/metrics refused {{instance}}",
                        ),
                    ),
                    width=24,
                ),
            ),
        ),
    ),
    variables=("instance",),
)

DASHBOARDS = {
    "kmeshd-node.json": NODE,
    "kmeshd-workload.json": WORKLOAD,
    "kmeshd-health.json": HEALTH,
}


# -- JSON ----------------------------------------------------------------------------------


def _target(target: Target, ref: str, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "refId": ref,
        "datasource": DS,
        "expr": target.expr,
        "legendFormat": target.legend,
        "range": not target.instant,
        "instant": target.instant,
    }
    if kind == "heatmap":
        out["format"] = "heatmap"
    elif kind == "table":
        out["format"] = "table"
    return out


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "targets": [
            _target(target, chr(ord("A") + i), panel.kind) for i, target in enumerate(panel.targets)
        ],
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "timeseries":
        out["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "heatmap":
        out["options"] = {
            "calculate": False,  # the buckets are kmeshd's: no re-bucketing
            "yAxis": {"unit": panel.unit},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5},
            "tooltip": {"show": True, "yHistogram": True},
        }
    else:  # a table: one row per series, its value last
        out["options"] = {"showHeader": True}
        out["transformations"] = [
            {"id": "organize", "options": {"excludeByName": {"Time": True}}},
            {"id": "sortBy", "options": {"sort": [{"field": "Value", "desc": True}]}},
        ]
    return out


def render(dashboard: Dashboard) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in dashboard.rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x = pid + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, pid, x, y))
            pid, x = pid + 1, x + panel.width
        y += 8
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["kmeshd"], "asDropdown": True, "title": "kmeshd"}
        ],
        "templating": {
            "list": [DATASOURCE_VARIABLE, *(variable(name) for name in dashboard.variables)]
        },
        "panels": panels,
    }


def text(dashboard: Dashboard) -> str:
    return json.dumps(render(dashboard), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    for name, dashboard in DASHBOARDS.items():
        (HERE / name).write_text(text(dashboard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
