"""A real Prometheus (Debian's ``prometheus`` package) in a subprocess, scraping our servers,
and the Grafana dashboard's queries with the dashboard's variables filled in.

Used by tests/test_dashboard.py (every panel's expression, evaluated on real scrapes) and by
benchmarks/dashboard_picture.py (docs/dashboard.png). Prometheus binds the port it is given
(it cannot pick one): started on a free loopback port, and again on another when that one was
taken meanwhile ("address already in use" in its log).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.servers import ROOT, free_port

DASHBOARD = ROOT / "dashboards" / "asgi-resilience.json"
JOB = "asgi-resilience"  # the scrape job's name, what the dashboard's $job selects
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")  # $name, ${name}, ${name:format}
_ADDRESS_IN_USE = "address already in use"


class PrometheusError(RuntimeError):
    """Prometheus refused a query (the message has its error), or did not start."""


@dataclass
class Prometheus:
    """A Prometheus process of ours and its HTTP API."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """``/api/v1/query``: the instant vector's samples (``metric``, ``value``)."""
        params = {"query": expr} if at is None else {"query": expr, "time": str(at)}
        return self._get("/api/v1/query", params)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """``/api/v1/query_range``: the range vector's series (``metric``, ``values``)."""
        params = {"query": expr, "start": str(start), "end": str(end), "step": str(step)}
        return self._get("/api/v1/query_range", params)

    def wait_for(
        self,
        expr: str,
        until: Callable[[list[dict[str, Any]]], bool],
        seconds: float = 15,
    ) -> list[dict[str, Any]]:
        """Query ``expr`` every 0.2 s until ``until(samples)``; then the samples."""
        deadline = time.monotonic() + seconds
        while True:
            samples = self.query(expr)
            if until(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} never came true in {seconds} s: {samples}")
            time.sleep(0.2)  # the next scrape: nothing to wait on but Prometheus' answers

    def stop(self) -> None:
        """SIGTERM by its pid, then SIGKILL if it is still there after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def _get(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        answer = httpx.get(self.url + path, params=params, timeout=10).json()
        if answer.get("status") != "success":
            raise PrometheusError(f"{params['query']}: {answer.get('error', answer)}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result


def start_prometheus(
    binary: str, targets: Sequence[str], folder: Path, *, interval: float = 0.5
) -> Prometheus:
    """Prometheus scraping ``targets`` (``host:port``) every ``interval`` seconds as job
    ``JOB``, its configuration, data and log in ``folder``, once it answers ``/-/ready``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    every = f"{round(interval * 1000)}ms"  # Prometheus' durations take no fractions
    scrape = {"scrape_interval": every, "scrape_timeout": every}
    job = {"job_name": JOB, "static_configs": [{"targets": list(targets)}]}
    config.write_text(json.dumps({"global": scrape, "scrape_configs": [job]}))  # YAML 1.2
    log = folder / "prometheus.log"
    for attempt in range(5):
        address = f"127.0.0.1:{free_port()}"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address={address}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        prometheus = Prometheus(process, f"http://{address}", log)
        try:
            _wait_until_ready(prometheus)
        except PrometheusError:
            prometheus.stop()
            if attempt == 4 or _ADDRESS_IN_USE not in log.read_text().lower():
                raise
            continue
        except BaseException:
            prometheus.stop()
            raise
        return prometheus
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _wait_until_ready(prometheus: Prometheus, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(prometheus.url + "/-/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if prometheus.process.poll() is not None or time.monotonic() > deadline:
            raise PrometheusError(f"Prometheus did not start:\n{prometheus.log.read_text()}")
        time.sleep(0.05)  # another process: nothing to wait on but its answers


@dataclass(frozen=True)
class PanelQuery:
    """One target of one dashboard panel, and the unit the panel shows it in."""

    panel: str
    ref_id: str
    legend: str
    expr: str
    unit: str


def panel_queries(dashboard: Path = DASHBOARD) -> list[PanelQuery]:
    """Every panel target of the dashboard, rows' nested panels included, in order."""
    loaded: dict[str, Any] = json.loads(dashboard.read_text())
    return [
        PanelQuery(
            panel["title"],
            target["refId"],
            target.get("legendFormat", ""),
            target["expr"],
            panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
        )
        for panel in _walk(loaded["panels"])
        for target in panel.get("targets", [])
    ]


def _walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk(panel.get("panels", []))


def fill_variables(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with Grafana's variables (``$job``, ``$__rate_interval``, ``${name}``...)
    replaced by ``values[name]``; a ``KeyError`` names a variable without a value."""

    def value(match: re.Match[str]) -> str:
        return values[match[1] or match[2]]

    return _VARIABLE.sub(value, expr)
