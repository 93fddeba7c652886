"""Every benchmark figure of the README, from one run, and the chart beside them.

    python -m benchmarks.report [--http-seconds 5] [--rounds 20] [--chart docs/benchmarks.png]

Runs, one after the other on the same machine: the instruction counts of every variant of
``benchmarks.overhead`` (under callgrind: repeatable whatever else the machine runs), the wall
time of the same variants in process (interleaved rounds, medians), and ``benchmarks.peers``'
HTTP comparison (uvicorn with h11 and with httptools, ``wrk``; skipped with ``--no-http``).
Prints the README's tables as Markdown, keeps the figures the chart needs beside it
(``docs/benchmarks.json``: ``--redraw`` draws it again from them) and draws the chart
(``matplotlib``, in the ``bench`` extra). Takes about a quarter of an hour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
from pathlib import Path

from benchmarks.overhead import (
    LARGE,
    SMALL,
    configure_access_log,
    instructions,
    measure,
    paired_difference,
    variants,
)
from benchmarks.peers import SERVERS, over_http

# The rows of the summary, the names of their variants in benchmarks.overhead.
SUMMARY = {
    "bare Starlette app": "bare",
    "peers (5 libraries)": "peers (5 libraries)",
    "`resilient()`, access log through a `JsonLinesSink`": "full stack, sink",
    "`resilient()`, access log through `logging`": "full stack",
    "`resilient()` without the access log": "full stack, no access log",
}
HTTP_NAMES = {
    "bare": "bare",
    "peers (5 libraries)": "peers",
    "full stack, sink": "resilient_sink",
    "full stack": "resilient",
    "full stack, no access log": "resilient_no_log",
}
LAYERS = {
    "`RequestIdMiddleware`": "RequestIdMiddleware",
    "`AccessLogMiddleware` through `logging`": "AccessLogMiddleware",
    "`AccessLogMiddleware` through a `JsonLinesSink`": "AccessLogMiddleware (sink)",
    "`ErrorMiddleware`": "ErrorMiddleware",
    "`EnvelopeMiddleware`": "EnvelopeMiddleware",
    "`RateLimitMiddleware` (memory)": "RateLimitMiddleware (memory)",
    "`MetricsMiddleware`": "MetricsMiddleware",
    "`TracingMiddleware` (no SDK)": "TracingMiddleware (no SDK)",
    "logging floor: one `logger.info` with 4 fields": "logging floor (reference)",
}


def count_all(names: list[str]) -> dict[str, float]:
    counted: dict[str, float] = {}
    for name in names:
        small, large = instructions(name, SMALL), instructions(name, LARGE)
        counted[name] = (large - small) / (LARGE - SMALL)
        print(f"  {name}: {counted[name] / 1000:.0f}k instructions", flush=True)
    return counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="in-process rounds")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--http-seconds", type=int, default=5)
    parser.add_argument("--http-rounds", type=int, default=3)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--chart", type=Path, default=Path("docs/benchmarks.png"))
    parser.add_argument(
        "--redraw", action="store_true", help="draw the chart again from the last run's figures"
    )
    args = parser.parse_args()
    figures = args.chart.with_suffix(".json")
    if args.redraw:
        saved = json.loads(figures.read_text())
        draw(args.chart, saved["instructions"], saved["http"])
        return

    apps = variants(configure_access_log())
    names = list(dict.fromkeys([*SUMMARY.values(), *LAYERS.values()]))
    print("instruction counts (callgrind):", flush=True)
    counted = count_all(names)
    print("wall time in process:", flush=True)
    samples = asyncio.run(
        measure({n: apps[n] for n in names}, args.rounds, args.requests, lambda _: None)
    )
    http: dict[str, dict[str, float]] = {}
    if not args.no_http and shutil.which("wrk"):
        http = over_http(args.http_seconds, args.http_rounds, 32, list(SERVERS))

    bare_i = counted["bare"]
    bare_t = statistics.median(samples["bare"])
    peers_added_i = counted["peers (5 libraries)"] - bare_i
    peers_added_t = paired_difference(samples, "peers (5 libraries)", "bare")
    print()
    columns = ["instructions/request", "x bare", "µs/request", "x bare"]
    columns += [f"HTTP {server}, of bare" for server in http]
    columns += ["peers add x"]
    print("| configuration | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for label, name in SUMMARY.items():
        value_i, value_t = counted[name], statistics.median(samples[name])
        cells = [
            f"{value_i / 1000:,.0f} k",
            f"{value_i / bare_i:.2f}",
            f"{value_t:.1f}",
            f"{value_t / bare_t:.2f}",
        ]
        cells += [f"{http[s][HTTP_NAMES[name]] / http[s]['bare']:.0%}" for s in http]
        added_i, added_t = value_i - bare_i, paired_difference(samples, name, "bare")
        if name.startswith("full stack") and added_i > 0 and added_t > 0:
            cells.append(f"{peers_added_i / added_i:.1f} / {peers_added_t / added_t:.1f}")
        else:
            cells.append("")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("| layer alone | instructions/request | x bare | added |")
    print("|---|---:|---:|---:|")
    for label, name in LAYERS.items():
        value_i = counted[name]
        print(
            f"| {label} | {value_i / 1000:,.0f} k | {value_i / bare_i:.2f} | "
            f"{(value_i - bare_i) / 1000:,.0f} k |"
        )
    figures.parent.mkdir(parents=True, exist_ok=True)
    figures.write_text(json.dumps({"instructions": counted, "http": http}, indent=1) + "\n")
    draw(args.chart, counted, http)


def draw(path: Path, counted: dict[str, float], http: dict[str, dict[str, float]]) -> None:
    """Two panels: what each configuration adds to a request (instructions), and the share of
    the bare app's HTTP throughput it keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["peers (5 libraries)", "ours, logging", "ours, sink", "ours, no access log"]
    names = ["peers (5 libraries)", "full stack", "full stack, sink", "full stack, no access log"]
    colors = ["#b0b0b0", "#3b7dd8", "#1f4e9c", "#7aa6e6"]
    added = [(counted[n] - counted["bare"]) / 1000 for n in names]
    panels = 2 if http else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.0), squeeze=False)
    left = axes[0][0]
    left.barh(labels[::-1], added[::-1], color=colors[::-1])
    left.set_xlabel("instructions added per request (thousands)")
    left.set_title(f"Cost per request (bare app: {counted['bare'] / 1000:.0f}k)", fontsize=10)
    for y, value in enumerate(added[::-1]):
        left.text(value, y, f" {value:,.0f}k", va="center", fontsize=8)
    left.set_xlim(0, max(added) * 1.25)
    if http:
        right = axes[0][1]
        servers = list(http)
        width = 0.8 / len(servers)
        for index, server in enumerate(servers):
            shares = [100 * http[server][HTTP_NAMES[n]] / http[server]["bare"] for n in names]
            positions = [y + index * width for y in range(len(names))][::-1]
            right.barh(positions, shares, height=width, label=f"uvicorn, {server}")
        middle = width * (len(servers) - 1) / 2  # the middle of each group of bars
        right.set_yticks([y + middle for y in range(len(names))][::-1], labels)
        right.axvline(80, color="#d04040", linewidth=1, linestyle="--")
        right.set_xlabel("requests/s, % of the bare app")
        right.set_title("Throughput over HTTP (one worker)", fontsize=10)
        right.set_xlim(0, 110)
        right.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"\nchart written to {path}")


if __name__ == "__main__":
    main()
