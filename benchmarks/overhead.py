"""Per-request overhead of each middleware and of ``resilient()``, driven directly through ASGI.

One small Starlette JSON endpoint, no sockets: every variant answers the same request in
interleaved rounds (so machine noise hits all of them alike), and the median microseconds per
request of each variant is printed with its ratio to the bare app. The access log writes real
JSON lines to ``/dev/null``: through a ``logging.FileHandler`` (the default), or through a
``JsonLinesSink`` (the variants marked "sink").

    python -m benchmarks.overhead [--rounds 30] [--requests 2000]
    python -m benchmarks.overhead --instructions [--variant NAME ...]

``--instructions`` counts instead of timing: each variant runs in its own process under
``valgrind --tool=callgrind`` (instrumentation switched on just before the requests), once
with 200 and once with 1,200 requests, and (I(1200) - I(200)) / 1000 is its instructions per
request: start-up and warm-up cancel out, and the count does not depend on what else the
machine runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_resilience import (
    AccessLogMiddleware,
    EnvelopeMiddleware,
    ErrorMiddleware,
    JsonFormatter,
    JsonLinesSink,
    MetricsMiddleware,
    RateLimitMiddleware,
    RequestIdLogFilter,
    RequestIdMiddleware,
    TracingMiddleware,
    resilient,
)
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send

UNLIMITED = "1000000/second"  # a rate limit that decides every request and denies none


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["item_id"], "name": "widget", "price": 9.5})


def make_app() -> Starlette:
    return Starlette(routes=[Route("/items/{item_id:int}", item)])


def configure_access_log() -> logging.Logger:
    """A real handler and formatter, writing to /dev/null, as a production service would."""
    logger = logging.getLogger("benchmarks.access")
    logger.handlers.clear()
    handler = logging.FileHandler(os.devnull)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdLogFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class LoggingFloor:
    """The least an access log can cost: one ``logger.info`` with four fields, same handler.

    The plain timing log a team writes when assembling peers by hand (``benchmarks.peers``
    uses it so), and the reference showing how much of our access log's cost is the logging
    machinery (record, handler lock, formatter, write) that any access log pays.
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        status = 0

        async def send_and_keep_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_and_keep_status)
        duration_ms = (perf_counter() - start) * 1000
        fields = {"method": scope["method"], "path": scope["path"], "status": status}
        self.logger.info("request done", extra={**fields, "duration_ms": duration_ms})


def variants(access_logger: logging.Logger) -> dict[str, ASGIApp]:
    # The pipeline of issue #2: request ids, access log, errors, envelopes (no metrics, no
    # tracing: benchmarks/peers.py measures the full stack against the peers).
    pipeline: dict[str, Any] = {
        "envelope": True,
        "access_logger": access_logger,
        "metrics": False,
        "tracing": False,
        "environ": {},
    }
    quiet = {**pipeline, "access_log": False}
    sink = JsonLinesSink(open(os.devnull, "w"))  # open for the whole run
    return {
        "bare": make_app(),
        "RequestIdMiddleware": RequestIdMiddleware(make_app()),
        "AccessLogMiddleware": AccessLogMiddleware(make_app(), logger=access_logger),
        "AccessLogMiddleware (sink)": AccessLogMiddleware(
            make_app(), logger=access_logger, sink=sink
        ),
        "ErrorMiddleware": ErrorMiddleware(make_app()),
        "EnvelopeMiddleware": EnvelopeMiddleware(make_app()),
        "RateLimitMiddleware (memory)": RateLimitMiddleware(
            make_app(), limit=UNLIMITED, registry=CollectorRegistry()
        ),
        "MetricsMiddleware": MetricsMiddleware(make_app(), registry=CollectorRegistry()),
        "TracingMiddleware (no SDK)": TracingMiddleware(make_app()),
        "resilient() pipeline": resilient(make_app(), **pipeline),
        "pipeline, sink": resilient(make_app(), **pipeline, access_log_sink=sink),
        "pipeline + rate limit": resilient(make_app(), **pipeline, rate_limit=UNLIMITED),
        "pipeline, no access log": resilient(make_app(), **quiet),
        "  + rate limit": resilient(make_app(), **quiet, rate_limit=UNLIMITED),
        "logging floor (reference)": LoggingFloor(make_app(), access_logger),
        **full_stacks(access_logger, sink),
    }


def full_stacks(access_logger: logging.Logger, sink: JsonLinesSink) -> dict[str, ASGIApp]:
    """The peers and our full stack of ``benchmarks.peers``, for the instruction counts."""
    from benchmarks.peers import our_stack, peer_stack, quiet_stack

    return {
        "peers (5 libraries)": peer_stack(access_logger),
        "full stack": our_stack(access_logger),
        "full stack, sink": our_stack(access_logger, sink=sink),
        "full stack, no access log": quiet_stack(),
    }


def make_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/items/42",
        "raw_path": b"/items/42",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"benchmark/1.0"),
            (b"accept", b"application/json"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def run_round(app: ASGIApp, requests: int) -> float:
    """Microseconds per request over ``requests`` sequential requests."""
    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    start = perf_counter()
    for _ in range(requests):
        await app(make_scope(), receive, send)
    elapsed = perf_counter() - start
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected statuses {set(statuses)}")
    return elapsed / requests * 1e6


async def measure(
    apps: dict[str, ASGIApp], rounds: int, requests: int, progress: Callable[[int], None]
) -> dict[str, list[float]]:
    """Microseconds per request of each app, one sample per round (rounds interleave apps)."""
    samples: dict[str, list[float]] = {name: [] for name in apps}
    for app in apps.values():  # warm-up: route tables, caches, code paths
        await run_round(app, 200)
    for round_number in range(rounds):
        for name, app in apps.items():
            samples[name].append(await run_round(app, requests))
        progress(round_number)
    return samples


def paired_difference(samples: dict[str, list[float]], with_: str, without: str) -> float:
    """The median of per-round differences: what ``with_`` adds to ``without``. Rounds pair
    the two measurements taken moments apart, so the machine's drift cancels out."""
    pairs = zip(samples[with_], samples[without], strict=True)
    return statistics.median(a - b for a, b in pairs)


SMALL, LARGE = 200, 1_200  # requests of the two counted runs


def instrument(on: bool) -> None:
    """Switch callgrind's instrumentation of this process on or off."""
    command = ["callgrind_control", f"--instr={'on' if on else 'off'}", str(os.getpid())]
    subprocess.run(command, check=True, capture_output=True)


async def counted(app: ASGIApp, requests: int) -> None:
    """Warm up, switch callgrind's instrumentation on, run ``requests``, switch it off."""
    await run_round(app, 200)
    instrument(True)
    await run_round(app, requests)
    instrument(False)


def instructions(name: str, requests: int) -> int:
    """Instructions callgrind counted for ``requests`` requests of variant ``name``."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "benchmarks.overhead",
                "--count",
                name,
                str(requests),
            ],
            check=True,
            capture_output=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        for line in out.read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"callgrind reported no total for {name!r}")


def print_instructions(names: list[str]) -> None:
    per_request: dict[str, float] = {}
    print(f"{'variant':<28} {'instructions/request':>21} {'x bare':>8} {'added':>9}")
    for name in ["bare", *[n for n in names if n != "bare"]]:
        small, large = instructions(name, SMALL), instructions(name, LARGE)
        per_request[name] = (large - small) / (LARGE - SMALL)
        bare = per_request["bare"]
        value = per_request[name]
        print(
            f"{name:<28} {value / 1000:>20.0f}k {value / bare:>8.2f} {(value - bare) / 1000:>8.0f}k"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--instructions", action="store_true", help="count, under callgrind")
    parser.add_argument("--variant", action="append", help="with --instructions: only these")
    parser.add_argument("--count", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    apps = variants(configure_access_log())
    if args.count:  # one counted run, inside callgrind
        asyncio.run(counted(apps[args.count[0]], int(args.count[1])))
        return
    if args.instructions:
        unknown = set(args.variant or ()) - set(apps)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(apps)}")
        print_instructions(args.variant or list(apps))
        return
    samples = asyncio.run(measure(apps, args.rounds, args.requests, lambda _: None))
    print_table(samples)
    # What the rate limiter adds where the request context already exists (the stack's case):
    # its decision, counter and headers, without the access log field it also causes.
    marginal = paired_difference(samples, "  + rate limit", "pipeline, no access log")
    print(f"rate limiter (memory) in the pipeline: {marginal:+.1f} µs per request")


def print_table(samples: dict[str, list[float]]) -> None:
    """Median µs per request of each variant, its ratio to ``bare`` and the time it adds
    (each round's own bare time subtracted: the median of the paired differences)."""
    bare = statistics.median(samples["bare"])
    print(f"{'variant':<28} {'µs/request':>11} {'x bare':>8} {'added µs':>9}")
    for name, values in samples.items():
        value = statistics.median(values)
        added = paired_difference(samples, name, "bare")
        print(f"{name:<28} {value:>11.1f} {value / bare:>8.2f} {added:>9.1f}")


if __name__ == "__main__":
    main()
