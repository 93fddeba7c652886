"""The Grafana dashboard (dashboards/asgi-resilience.json) queries only metrics we emit, and
every one of its queries runs on a real Prometheus scraping a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from asgi_resilience.metrics import DECLARED, Metrics
from tests.prometheus_server import (
    JOB,
    Prometheus,
    PrometheusError,
    fill_variables,
    panel_queries,
    start_prometheus,
)
from tests.servers import ServerProcess, start_command

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


# -- against a real Prometheus -------------------------------------------------------------------

CLI = [sys.executable, "-m", "asgi_resilience.cli"]
SHUTDOWN_COUNT = "asgi_resilience_shutdown_resource_duration_seconds_count"
# What Grafana would put in place of the dashboard's variables for the test's few seconds.
VARIABLES = {"job": JOB, "__rate_interval": "1m", "__range": "5m", "__interval": "1s"}
# Panels about features tests/apps/held.py does not use: valid queries with nothing to show.
UNUSED_FEATURES = {
    "Concurrency limit, in flight and event-loop lag",
    "Load shed and request timeouts",
    "Open WebSocket sessions by route",
    "WebSocket session duration p50 / p95 by route",
}


@pytest.fixture
def prometheus_binary() -> str:
    """Debian's ``prometheus``; skip without it, except under CI (``CI=true``): fail."""
    path = shutil.which("prometheus")
    if path is not None:
        return path
    message = "prometheus is not installed (apt-get install prometheus)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}, and CI=true requires it", pytrace=False)
    pytest.skip(message)


def test_every_variable_of_every_query_has_a_value() -> None:
    for query in panel_queries():
        assert "$" not in fill_variables(query.expr, VARIABLES), query.panel


@pytest.fixture
def scraped(tmp_path: Path, prometheus_binary: str) -> Iterator[tuple[ServerProcess, Prometheus]]:
    """``asgi-resilience run tests.apps.held:app --workers 2`` and a Prometheus scraping it
    every half second; both stopped at the end (Prometheus by its pid)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASGI_RESILIENCE_", "_ASGI"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the command's own directory
    env.update(HELD_FILE=str(tmp_path / "held.txt"), RELEASE_FILE=str(tmp_path / "release"))
    command = [*CLI, "run", "tests.apps.held:app", "--workers", "2", "--port"]
    started: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "server.log"
    try:
        server = start_command(
            lambda port: [*command, str(port)], env=env, log=log, started=started
        )
        target = f"127.0.0.1:{server.port}"
        prometheus = start_prometheus(prometheus_binary, [target], tmp_path / "prometheus")
        try:
            yield server, prometheus
        finally:
            prometheus.stop()
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(5)


def send_traffic(client: httpx.Client) -> set[int]:
    """2xx, 404, 500, 429, breaker calls and readiness probes; the pids that served them."""
    pids = {int(client.get("/pid").text) for _ in range(12)}
    statuses = [client.get(path).status_code for path in ("/fail", "/nowhere", "/search")]
    statuses += [client.get("/limited").status_code for _ in range(6)]  # 2/minute per worker
    assert {500, 404, 200, 429} <= set(statuses), statuses
    assert all(client.get("/health/ready").status_code == 200 for _ in range(4))
    return pids


def evaluate_panels(prometheus: Prometheus) -> dict[str, list[dict[str, Any]]]:
    """Every panel's samples now, its targets' together; every query must be valid PromQL."""
    answers: dict[str, list[dict[str, Any]]] = {}
    errors = []
    for query in panel_queries():
        try:
            samples = prometheus.query(fill_variables(query.expr, VARIABLES))
        except PrometheusError as exc:
            errors.append(f"{query.panel} {query.ref_id}: {exc}")
        else:
            answers.setdefault(query.panel, []).extend(samples)
    assert errors == []
    return answers


@pytest.mark.prometheus
def test_every_panel_query_runs_on_a_real_prometheus_and_shows_a_first_shutdown(
    scraped: tuple[ServerProcess, Prometheus],
) -> None:
    server, prometheus = scraped
    pool_ok = f'{SHUTDOWN_COUNT}{{resource="pool", outcome="ok"}}'
    fresh_connections = httpx.Limits(max_keepalive_connections=0)  # both workers get some
    with httpx.Client(base_url=server.base_url, timeout=10, limits=fresh_connections) as client:
        pids = send_traffic(client)
        # Scraped at 0 before the first shutdown (exported from startup on)...
        prometheus.wait_for(f"count_over_time({pool_ok}[1m]) >= 2", bool)
        # ...then one worker stops gracefully; uvicorn starts another, the other serves on.
        os.kill(min(pids), signal.SIGTERM)
        prometheus.wait_for(f"sum({pool_ok}) >= 1", bool)
        send_traffic(client)
    total = 'sum(http_server_request_duration_seconds_count{route="/pid"})'
    prometheus.wait_for(f"{total} == 24", bool)  # every request scraped, the stopped one's too

    answers = evaluate_panels(prometheus)
    assert {panel for panel, samples in answers.items() if not samples} == UNUSED_FEATURES
    shutdowns = {
        (s["metric"]["resource"], s["metric"]["outcome"]): float(s["value"][1])
        for s in answers["Shutdown resource outcomes"]
    }
    assert shutdowns[("pool", "ok")] > 0.5  # extrapolated by increase(): about 1
    assert shutdowns[("pool", "error")] == shutdowns[("pool", "timeout")] == 0
