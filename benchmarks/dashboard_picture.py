"""A picture of the Grafana dashboard: its own queries, on a real Prometheus, over the demo.

    python -m benchmarks.dashboard_picture [--seconds 90] [--out docs/dashboard.png]

Grafana is not packaged for these machines, so this draws what its main panels would show:
it starts the demo (``asgi-resilience demo``) and Debian's ``prometheus`` scraping it every
second, drives mixed load (pages, 404s, 500s, streams, slow requests; then a burst the rate
limit answers with 429s and a run of failures; then slower requests), reads each panel's
expressions from dashboards/asgi-resilience.json, asks Prometheus for them over the run
(``/api/v1/query_range``) and plots them, one small panel each, with matplotlib (the ``bench``
extra). Takes ``--seconds`` plus about ten.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.prometheus_server import (
    JOB,
    PanelQuery,
    Prometheus,
    fill_variables,
    panel_queries,
    start_prometheus,
)
from tests.servers import start_command

PANELS = (  # the dashboard's titles, in the picture's order (two rows of three)
    "Request rate by route",
    "Error ratio (5xx) by route",
    "Request duration p50 / p95 / p99 by route",
    "Active requests",
    "Rate limit decisions by outcome",
    "Exceptions by type",
)
SCRAPE_SECONDS = 1.0
# What Grafana puts in place of the variables for a short range scraped every second.
VARIABLES = {"job": JOB, "__rate_interval": "10s", "__interval": "1s", "__range": "2m"}
# Grafana's dark theme and its classic palette.
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = [
    *("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0"),
    *("#508642", "#cca300", "#447ebc", "#c15c17", "#890f02", "#0a437c", "#6d1f62", "#584477"),
]
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


async def drive_load(base_url: str, seconds: float) -> None:
    """Mixed traffic for ``seconds``: steady pages, then a burst and failures, then slowness."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        started = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        while (elapsed := time.monotonic() - started) < seconds:
            paths = paths_for_second(elapsed / seconds)
            for path in paths:
                task = asyncio.create_task(_get(client, path))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(0.95 / len(paths))  # spread over the second
            await asyncio.sleep(max(0.0, started + math.floor(elapsed) + 1 - time.monotonic()))
        await asyncio.gather(*tasks)


def paths_for_second(progress: float) -> list[str]:
    """The requests of one second, ``progress`` (0-1) into the run, in random order."""
    paths = [f"/items/{random.randint(1, 3)}" for _ in range(14)]
    paths += ["/items/404", "/nowhere", "/stream"] + ["/boom"] * (random.random() < 0.3)
    paths.append(f"/slow?seconds={random.uniform(0.05, 0.3):.2f}")
    if 0.35 <= progress < 0.55:  # a client in a loop: the rate limit (50/s) answers 429
        paths += ["/items/1"] * 50 + ["/boom"] * 3
    if 0.65 <= progress < 0.85:  # the database slows down
        paths += [f"/slow?seconds={random.uniform(0.8, 2.5):.2f}" for _ in range(4)]
    random.shuffle(paths)
    return paths


async def _get(client: httpx.AsyncClient, path: str) -> None:
    try:
        await client.get(path)
    except httpx.HTTPError as exc:
        print(f"  {path}: {exc!r}", file=sys.stderr)


Series = list[tuple[str, list[float], list[float]]]  # (legend, seconds into the run, values)


def query_panels(prometheus: Prometheus, start: float, end: float) -> dict[PanelQuery, Series]:
    """The series of each target of the picture's panels over ``start``-``end``."""
    drawn: dict[PanelQuery, Series] = {}
    for query in panel_queries():
        if query.panel not in PANELS:
            continue
        expr = fill_variables(query.expr, VARIABLES)
        drawn[query] = [
            (
                legend(query.legend, series["metric"]),
                [float(at) - start for at, _ in series["values"]],
                [float(value) for _, value in series["values"]],
            )
            for series in prometheus.query_range(expr, start, end, SCRAPE_SECONDS)
        ]
    return drawn


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format, filled in."""
    return _LEGEND_LABEL.sub(lambda match: labels.get(match[1], ""), template).strip() or "-"


def draw(path: Path, queried: dict[PanelQuery, Series], seconds: float) -> None:
    """The panels in a grid, in Grafana's dark colours, over the run's ``seconds``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, grid = plt.subplots(2, 3, figsize=(15, 9), facecolor=BACKGROUND, layout="constrained")
    for axes, title in zip(grid.flat, PANELS, strict=True):
        queries = [query for query in queried if query.panel == title]
        lines = sorted(line for query in queries for line in queried[query])
        scale, suffix = _UNITS.get(queries[0].unit, (1.0, ""))
        axes.set_facecolor(PANEL)
        axes.set_title(title, color=TEXT, fontsize=10, loc="left")
        axes.tick_params(colors=TEXT, labelsize=8)
        axes.grid(color=GRID, linewidth=0.6)
        for side in axes.spines.values():
            side.set_color(GRID)
        for index, (name, times, values) in enumerate(lines):
            color = PALETTE[index % len(PALETTE)]
            axes.plot(times, [v * scale for v in values], color=color, linewidth=1.2, label=name)
        axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _, s=suffix: f"{y:g}{s}"))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.0f}s"))
        axes.set_xlim(0, seconds)
        axes.set_ylim(bottom=0)
        if lines:  # below the graph, as Grafana's legend
            axes.legend(
                fontsize=7,
                ncol=3,
                loc="upper left",
                bbox_to_anchor=(0, -0.1),
                frameon=False,
                labelcolor=TEXT,
                handlelength=1.2,
                columnspacing=1.0,
            )
    figure.suptitle(
        "dashboards/asgi-resilience.json: the demo under mixed load, queried from Prometheus",
        color=TEXT,
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, facecolor=BACKGROUND)
    print(f"picture written to {path}")


# A unit of Grafana's: what values are multiplied by, and what follows them.
_UNITS = {"percentunit": (100.0, "%"), "s": (1000.0, " ms"), "reqps": (1.0, "/s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the load lasts")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASGI_RESILIENCE_", "_ASGI"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    started: list[subprocess.Popen[bytes]] = []
    prometheus: Prometheus | None = None
    with tempfile.TemporaryDirectory(prefix="dashboard-picture-") as folder:
        try:
            demo = [sys.executable, "-m", "asgi_resilience.cli", "demo", "--port"]
            log = Path(folder) / "demo.log"
            server = start_command(
                lambda port: [*demo, str(port)], env=env, log=log, started=started
            )
            prometheus = start_prometheus(
                args.prometheus, [f"127.0.0.1:{server.port}"], Path(folder), interval=SCRAPE_SECONDS
            )
            start = time.time()
            print(f"demo on {server.base_url}, Prometheus on {prometheus.url}: {args.seconds:g}s")
            asyncio.run(drive_load(server.base_url, args.seconds))
            time.sleep(2 * SCRAPE_SECONDS)  # the last requests scraped
            end = time.time()
            panels = query_panels(prometheus, start, end)
            server.stop()
        finally:
            if prometheus is not None:
                prometheus.stop()
            for process in started:
                if process.poll() is None:
                    process.kill()
                    process.wait(5)
    draw(args.out, panels, end - start)


if __name__ == "__main__":
    main()
