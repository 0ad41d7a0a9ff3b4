"""The Grafana dashboard and the PrometheusRule alerts in deploy/ against workerkit's metrics.

Every PromQL expression is parsed (promql-parser, the Rust parser GreptimeDB uses) and every
metric it selects must be a family the supervisor's registry defines (with the suffixes the
exposition adds: ``_total``, ``_bucket``, ``_count``, ``_sum``); label values of enumerated labels
(``outcome``, ``state``, ``reason``) must be ones workerkit emits, so a typo cannot leave a panel
or an alert silently matching nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.support.k8s import validate_crd
from workerkit.events import (
    IDEMPOTENCY_OUTCOMES,
    OUTCOMES,
    PAYLOAD_REFUSALS,
    SCHEDULE_FIRE_OUTCOMES,
)
from workerkit.supervisor.metrics import SHUTDOWN_OUTCOMES, STATES, SupervisorMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/workerkit-dashboard.json"
ALERTS = ROOT / "deploy/helm/workerkit/files/alerts.yaml"
FAILURE_MODES = ROOT / "docs/operations/failure-modes.md"

#: Labels a query may match or group on: workerkit's own, the histogram's ``le``, and the
#: target labels a ServiceMonitor/PodMonitor adds.
LABELS = {"engine", "queue", "task", "outcome", "state", "reason", "schedule", "le"}
TARGET_LABELS = {"namespace", "pod"}
#: (metric, label) -> every value workerkit emits for it.
ENUMERATED = {
    ("workerkit_jobs_total", "outcome"): OUTCOMES | {"unknown"},
    ("workerkit_shutdowns_total", "outcome"): frozenset(SHUTDOWN_OUTCOMES),
    ("workerkit_worker_state", "state"): frozenset(STATES),
    ("workerkit_idempotency_total", "outcome"): IDEMPOTENCY_OUTCOMES,
    ("workerkit_payloads_refused_total", "reason"): PAYLOAD_REFUSALS,
    ("workerkit_scheduler_fires_total", "outcome"): SCHEDULE_FIRE_OUTCOMES,
}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum")}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def registry_series() -> dict[str, str]:
    """Every series name workerkit's registry exposes -> its family, scheduler's included."""
    metrics = SupervisorMetrics("sql", scheduler=True)
    names: dict[str, str] = {}
    for family in metrics.registry.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = family.name
    return names


def grafana_to_promql(expr: str) -> str:
    """A Grafana query with its variables replaced, so that it parses as PromQL."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?\w+(:\w+)?\}?", "x", expr)


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]], list[str]]]:
    """(metric, [(label, op, value)], grouping labels) of each selector and aggregation."""
    found: list[tuple[str, list[tuple[str, str, str]], list[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [(m.name, str(m.op), m.value) for m in node.matchers.matchers]
            found.append((node.name or "", matchers, []))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            found.append(("", [], list(node.modifier.labels)))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def problems_of(expr: str, series: dict[str, str]) -> list[str]:
    """What is wrong with one PromQL expression against the registry ([] when nothing)."""
    try:
        found = selectors(expr)
    except ValueError as exc:
        return [f"does not parse: {exc}"]
    problems = []
    for name, matchers, grouping in found:
        if name and name not in series:
            problems.append(f"unknown metric {name!r}")
        labels = [m[0] for m in matchers] + grouping
        problems += [
            f"unknown label {label!r}"
            for label in labels
            if label not in LABELS | TARGET_LABELS | {"__name__"}
        ]
        for label, op, value in matchers:
            allowed = ENUMERATED.get((name, label))
            if allowed is None or "Not" in op:
                continue
            values = value.split("|") if "Re" in op else [value]
            problems += [
                f"{name}: {label}={v!r} is never emitted" for v in values if v not in allowed
            ]
    return problems


def used_metrics(expr: str) -> set[str]:
    return {name for name, _, _ in selectors(expr) if name}


# --- the dashboard -----------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r}", grafana_to_promql(target["expr"])
    for var in dashboard["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        inner = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert inner is not None, f"variable {var['name']}: {query!r} is not label_values(...)"
        assert inner[2] in LABELS | TARGET_LABELS, f"variable {var['name']}: label {inner[2]}"
        yield f"variable {var['name']}", grafana_to_promql(inner[1])


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "workerkit"
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"namespace", "pool"} <= variables
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
            assert 'pod=~"$pool-[a-z0-9]+-[a-z0-9]{5}"' in target["expr"], panel["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_queries_use_only_workerkit_metrics() -> None:
    series = registry_series()
    problems = [
        f"{where}: {problem} in {expr}"
        for where, expr in dashboard_queries(load_dashboard())
        for problem in problems_of(expr, series)
    ]
    assert not problems, "\n".join(problems)


def test_dashboard_shows_every_metric_family() -> None:
    """A family the supervisor exports but no panel shows is a gap in the dashboard."""
    series = registry_series()
    shown = {
        series[name]
        for _, expr in dashboard_queries(load_dashboard())
        for name in used_metrics(expr)
    }
    assert set(series.values()) - shown == set()


# --- the alerts --------------------------------------------------------------------------------


def load_alerts() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return data


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_alerts()["groups"] for rule in group["rules"]]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    found = set()
    for line in markdown.splitlines():
        heading = re.match(r"^#+\s+(.*)$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def test_alerts_file_is_the_groups_of_a_prometheus_rule() -> None:
    alerts = load_alerts()
    assert list(alerts) == ["groups"]
    names = [group["name"] for group in alerts["groups"]]
    assert len(names) == len(set(names))
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "workerkit"},
        "spec": alerts,
    }
    assert validate_crd(rule) == []


def test_every_alert_has_for_severity_annotations_and_a_runbook() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    doc_anchors = anchors(FAILURE_MODES.read_text())
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Workerkit[A-Z][A-Za-z]+", name), name
        assert DURATION.match(rule["for"]), f"{name}: for {rule.get('for')!r}"
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/operations/failure-modes.md", name
        assert anchor in doc_anchors, f"{name}: no heading #{anchor} in {page}"


def test_alert_expressions_use_only_workerkit_metrics() -> None:
    series = registry_series()
    problems = [
        f"{rule['alert']}: {problem}"
        for rule in alert_rules()
        for problem in problems_of(rule["expr"], series)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum(rate(workerkit_jobs_totl[5m]))", "unknown metric 'workerkit_jobs_totl'"),
        ('workerkit_shutdowns_total{outcome="killed"}', "outcome='killed' is never emitted"),
        ('workerkit_worker_state{state=~"ready|drainin"}', "state='drainin' is never emitted"),
        ("sum by (qeue) (workerkit_queue_depth)", "unknown label 'qeue'"),
        ("sum(rate(workerkit_jobs_total[5m])", "does not parse"),
    ],
)
def test_the_metric_check_bites(expr: str, problem: str) -> None:
    assert any(problem in found for found in problems_of(expr, registry_series()))


def test_the_checks_cover_the_required_alerts() -> None:
    """Stuck drains, forced kills, crash-recovered jobs, queue latency, the scheduler, readiness."""
    used = {rule["alert"]: used_metrics(rule["expr"]) for rule in alert_rules()}
    everything = set().union(*used.values())
    for metric in (
        "workerkit_worker_state",
        "workerkit_shutdowns_total",
        "workerkit_jobs_total",
        "workerkit_queue_wait_seconds_bucket",
        "workerkit_queue_oldest_job_age_seconds",
        "workerkit_scheduler_leader",
        "workerkit_scheduler_fire_delay_seconds_bucket",
        "workerkit_store_up",
    ):
        assert metric in everything, metric
