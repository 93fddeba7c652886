"""The full ``resilient()`` stack against the peers it replaces, in process and over HTTP.

Same features on both sides: request ids, Prometheus metrics, rate limiting (memory, never
denying), OpenTelemetry tracing (API only, no SDK configured, as most services run it until
they add one) and a timing log (JSON lines through the same handler to /dev/null). Peers, outermost
first: opentelemetry-instrumentation-asgi, asgi-correlation-id, starlette-exporter, a plain
timing-log middleware, slowapi's ASGI middleware.

    python -m benchmarks.peers inprocess [--rounds 20 --requests 2000]
    python -m benchmarks.peers http [--seconds 5 --rounds 3 --connections 32]   # needs wrk

The HTTP mode starts uvicorn (one worker, no access log) on a free 127.0.0.1 port for each
variant and drives it with ``wrk``; rounds are interleaved across variants.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import time

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_resilience import TracingMiddleware, resilient
from asgi_resilience.types import ASGIApp
from benchmarks.overhead import LoggingFloor, configure_access_log, measure

UNLIMITED = "1000000/second"


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["item_id"], "name": "widget", "price": 9.5})


def make_app() -> Starlette:
    return Starlette(routes=[Route("/items/{item_id:int}", item)])


def peer_stack(logger: logging.Logger) -> ASGIApp:
    from asgi_correlation_id import CorrelationIdMiddleware
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from slowapi import Limiter
    from slowapi.middleware import SlowAPIASGIMiddleware
    from slowapi.util import get_remote_address
    from starlette_exporter import PrometheusMiddleware

    app = make_app()
    app.state.limiter = Limiter(key_func=get_remote_address, default_limits=[UNLIMITED])
    app.add_middleware(SlowAPIASGIMiddleware)  # it reads scope["app"]: inside Starlette
    stack: ASGIApp = LoggingFloor(app, logger)  # the plain timing log teams write
    stack = PrometheusMiddleware(stack)
    stack = CorrelationIdMiddleware(stack)
    return OpenTelemetryMiddleware(stack)


def our_stack(logger: logging.Logger) -> ASGIApp:
    return resilient(
        make_app(), rate_limit=UNLIMITED, access_logger=logger, registry=CollectorRegistry()
    )


def variant(name: str) -> ASGIApp:
    """The app for ``name`` (``bare``, ``peers``, ``resilient``): what uvicorn serves."""
    logger = configure_access_log()
    if name == "bare":
        return make_app()
    if name == "peers":
        return peer_stack(logger)
    if name == "resilient":
        return our_stack(logger)
    raise ValueError(f"unknown variant {name!r}")


def in_process(rounds: int, requests: int) -> None:
    logger = configure_access_log()
    apps: dict[str, ASGIApp] = {
        "bare": make_app(),
        "TracingMiddleware (no SDK)": TracingMiddleware(make_app()),
        "peers (5 libraries)": peer_stack(logger),
        "resilient() full stack": our_stack(logger),
        "resilient(), no access log": resilient(
            make_app(), rate_limit=UNLIMITED, access_log=False, registry=CollectorRegistry()
        ),
    }
    medians = asyncio.run(measure(apps, rounds, requests, lambda _: None))
    bare = medians["bare"]
    print(f"{'variant':<28} {'µs/request':>11} {'x bare':>8} {'added µs':>9}")
    for name, value in medians.items():
        print(f"{name:<28} {value:>11.1f} {value / bare:>8.2f} {value - bare:>9.1f}")
    peers_added = medians["peers (5 libraries)"] - bare
    ours_added = medians["resilient() full stack"] - bare
    print(f"peers add {peers_added / ours_added:.1f}x the time resilient() adds")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            f"benchmarks.peers:{name.upper()}",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env={**os.environ, "BENCH_VARIANT": name},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, url
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"uvicorn for {name} did not start")


def _wrk(url: str, seconds: int, connections: int) -> float:
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"{url}/items/42"],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None or "Non-2xx" in output:
        raise RuntimeError(f"wrk output not as expected:\n{output}")
    return float(match.group(1))


def over_http(seconds: int, rounds: int, connections: int) -> None:
    names = ("bare", "peers", "resilient")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            process, url = _serve(name)
            try:
                _wrk(url, 1, connections)  # warm-up
                samples[name].append(_wrk(url, seconds, connections))
            finally:
                process.terminate()
                process.wait(10)
    bare = statistics.median(samples["bare"])
    print(f"{'variant':<12} {'requests/s':>11} {'of bare':>8}")
    for name in names:
        value = statistics.median(samples[name])
        print(f"{name:<12} {value:>11.0f} {value / bare:>8.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    inprocess = sub.add_parser("inprocess")
    inprocess.add_argument("--rounds", type=int, default=20)
    inprocess.add_argument("--requests", type=int, default=2000)
    http = sub.add_parser("http")
    http.add_argument("--seconds", type=int, default=5)
    http.add_argument("--rounds", type=int, default=3)
    http.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if args.mode == "inprocess":
        in_process(args.rounds, args.requests)
    else:
        over_http(args.seconds, args.rounds, args.connections)


def __getattr__(name: str) -> ASGIApp:
    """``benchmarks.peers:BARE``, ``:PEERS``, ``:RESILIENT``: what the HTTP mode serves."""
    if name in ("BARE", "PEERS", "RESILIENT"):
        return variant(name.lower())
    raise AttributeError(name)


if __name__ == "__main__":
    main()
