"""The Grafana dashboard (dashboards/asgi-resilience.json) queries only metrics we emit."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from asgi_resilience.metrics import DECLARED, Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "asgi-resilience.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# The series names each metric type exposes (the names a query can select).
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
# PromQL words that are neither functions (followed by a parenthesis) nor metric names.
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan", "start", "end"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_MATCHERS_OR_RANGE = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (``rate(x_total[5m])`` -> ``x_total``)."""
    if "__name__" in expr:
        raise ValueError(f"select metrics by name, not by __name__: {expr!r}")
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = _MATCHERS_OR_RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        followed_by = text[match.end() :].lstrip()[:1]
        if followed_by == "(" or match.group() in KEYWORDS:
            continue  # a function, an aggregation or an operator
        names.add(match.group())
    return names


def emitted_series() -> dict[str, str]:
    """Every series name asgi_resilience's collectors expose -> its metric family."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for declared in DECLARED:  # every feature's own, declared where the feature lives
        metrics.feature(declared)
    series: dict[str, str] = {}
    for family in registry.collect():
        for sample in family.samples:
            series[sample.name] = family.name
        for suffix in SERIES_SUFFIXES[family.type]:
            series[family.name + suffix] = family.name
    return series


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in walk_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target


def test_the_dashboard_is_a_grafana_dashboard_with_unique_panel_ids(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(walk_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    assert all(isinstance(i, int) for i in ids)
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
            assert 'job=~"$job"' in target["expr"], panel["title"]


def test_the_datasource_is_a_variable(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["job"]["datasource"] == DATASOURCE


def test_every_panel_queries_only_metrics_we_emit(dashboard: dict[str, Any]) -> None:
    emitted = emitted_series()
    unknown = {
        (title, name)
        for title, target in targets(dashboard)
        for name in metric_names(target["expr"])
        if name not in emitted
    }
    assert unknown == set()
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            for name in _LABEL_VALUES.findall(query["query"]):
                assert name in emitted, variable["name"]


def test_every_metric_we_emit_has_a_panel(dashboard: dict[str, Any]) -> None:
    emitted = emitted_series()
    queried = {
        emitted[name]
        for _, target in targets(dashboard)
        for name in metric_names(target["expr"])
        if name in emitted
    }
    assert queried == set(emitted.values())


def test_the_panels_the_dashboard_promises(dashboard: dict[str, Any]) -> None:
    exprs = {title: [t["expr"] for t in ts] for title, ts in _targets_by_title(dashboard).items()}
    latency = exprs["Request duration p50 / p95 / p99 by route"]
    for quantile, expr in zip(("0.5", "0.95", "0.99"), latency, strict=True):
        assert expr.startswith(f"histogram_quantile({quantile}, sum by (le, route)")
        assert "http_server_request_duration_seconds_bucket" in expr
    assert 'status_code=~"5.."' in exprs["Error ratio (5xx) by route"][0]
    assert (
        "http_server_time_to_first_byte_seconds_bucket"
        in exprs["Time to first byte p95 by route"][0]
    )
    assert "by (outcome)" in exprs["Rate limit decisions by outcome"][0]
    assert "by (exception_type, route)" in exprs["Exceptions by type"][0]


def _targets_by_title(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for title, target in targets(dashboard):
        grouped.setdefault(title, []).append(target)
    return grouped


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (route) (rate(a_total{job=~"$job", x="y{z}"}[$__rate_interval]))', {"a_total"}),
        ("histogram_quantile(0.95, sum(rate(h_bucket[5m])) by (le))", {"h_bucket"}),
        ("sum by (c, o) (s_sum) / sum by (c, o) (s_count)", {"s_sum", "s_count"}),
        ("max(g) == 1 and on (x) other_metric offset 1h", {"g", "other_metric"}),
        ("up_total > bool 1e3 or vector(0)", {"up_total"}),
        ("sum(rate(http_requests_total[1m]))", {"http_requests_total"}),
    ],
)
def test_metric_names_are_extracted_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_a_metric_we_do_not_emit_is_caught() -> None:
    emitted = emitted_series()
    assert "http_requests_total" not in emitted  # a name from another exporter
    assert "http_server_active_requests_total" not in emitted  # a gauge has no _total
    assert "http_server_request_duration_seconds" not in emitted  # histograms: _bucket/...
    assert "http_server_exceptions_total" in emitted
    assert "http_server_request_duration_seconds_bucket" in emitted
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__="http_server_active_requests"}')
