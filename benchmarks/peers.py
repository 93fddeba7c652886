"""The full ``resilient()`` stack against the peers it replaces, in process and over HTTP.

Same features on both sides: request ids, Prometheus metrics, rate limiting (memory, never
denying), OpenTelemetry tracing (API only, no SDK configured, as most services run it until
they add one) and a timing log (JSON lines through the same handler to /dev/null). Peers, outermost
first: opentelemetry-instrumentation-asgi, asgi-correlation-id, starlette-exporter, a plain
timing-log middleware, slowapi's ASGI middleware.

    python -m benchmarks.peers inprocess [--rounds 20 --requests 2000]
    python -m benchmarks.peers http [--seconds 5 --rounds 3 --connections 32 --server both]

The HTTP mode (needs ``wrk``) starts uvicorn (one worker, no access log of its own) on a free
127.0.0.1 port for each variant, with h11 and asyncio and then with httptools and uvloop
(``uvicorn[standard]``), and drives it with ``wrk``; rounds are interleaved across variants,
server and load generator each on a CPU of their own. "µs added" is the CPU time per request
the variant adds to the saturated server's (1/throughput minus the bare app's).
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

from asgi_resilience import JsonLinesSink, TracingMiddleware, resilient
from asgi_resilience.types import ASGIApp
from benchmarks.overhead import (
    UNLIMITED,
    LoggingFloor,
    configure_access_log,
    measure,
    paired_difference,
    print_table,
)


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


def our_stack(logger: logging.Logger, sink: JsonLinesSink | None = None) -> ASGIApp:
    return resilient(
        make_app(),
        rate_limit=UNLIMITED,
        access_logger=logger,
        access_log_sink=sink,
        registry=CollectorRegistry(),
        environ={},
    )


def quiet_stack() -> ASGIApp:
    """Our stack without the access log: what the rest of it costs."""
    return resilient(
        make_app(),
        rate_limit=UNLIMITED,
        access_log=False,
        registry=CollectorRegistry(),
        environ={},
    )


VARIANTS = ("bare", "peers", "resilient", "resilient_sink", "resilient_no_log")


def variant(name: str) -> ASGIApp:
    """The app for ``name`` (one of ``VARIANTS``): what uvicorn serves."""
    logger = configure_access_log()
    if name == "bare":
        return make_app()
    if name == "peers":
        return peer_stack(logger)
    if name == "resilient":
        return our_stack(logger)
    if name == "resilient_sink":  # the production configuration: JSON lines, no logging
        return our_stack(logger, sink=JsonLinesSink(open(os.devnull, "w")))
    if name == "resilient_no_log":
        return quiet_stack()
    raise ValueError(f"unknown variant {name!r}")


def in_process(rounds: int, requests: int) -> None:
    logger = configure_access_log()
    apps: dict[str, ASGIApp] = {
        "bare": make_app(),
        "TracingMiddleware (no SDK)": TracingMiddleware(make_app()),
        "peers (5 libraries)": peer_stack(logger),
        "resilient() full stack": our_stack(logger),
        "resilient(), no access log": quiet_stack(),
    }
    samples = asyncio.run(measure(apps, rounds, requests, lambda _: None))
    print_table(samples)
    peers_added = paired_difference(samples, "peers (5 libraries)", "bare")
    for name in ("resilient() full stack", "resilient(), no access log"):
        ours = paired_difference(samples, name, "bare")
        print(f"peers add {peers_added / ours:.1f}x the time {name} adds")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# uvicorn's two stacks: the pure-Python one (``pip install uvicorn``) and the one of
# ``uvicorn[standard]`` (httptools parser, uvloop event loop), whose lower per-request cost
# makes any middleware's share larger.
SERVERS = {
    "h11": ["--http", "h11", "--loop", "asyncio"],
    "httptools": ["--http", "httptools", "--loop", "uvloop"],
}


def _cpus() -> tuple[set[int], set[int]] | None:
    """One CPU for the server, another for wrk (fewer migrations, steadier figures)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return ({cpus[0]}, {cpus[1]}) if len(cpus) >= 2 else None


def _serve(name: str, server: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cpus = _cpus()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            f"benchmarks.peers:{name.upper()}",
            "--port",
            str(port),
            *SERVERS[server],
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env={**os.environ, "BENCH_VARIANT": name},
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus[0])) if cpus else None,
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
    cpus = _cpus()
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"{url}/items/42"],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus[1])) if cpus else None,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None or "Non-2xx" in output:
        raise RuntimeError(f"wrk output not as expected:\n{output}")
    return float(match.group(1))


def over_http(
    seconds: int, rounds: int, connections: int, servers: list[str]
) -> dict[str, dict[str, float]]:
    """Median requests/s of each variant, per server (and printed as tables)."""
    results: dict[str, dict[str, float]] = {}
    for server in servers:
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name in VARIANTS:
                process, url = _serve(name, server)
                try:
                    _wrk(url, 1, connections)  # warm-up
                    samples[name].append(_wrk(url, seconds, connections))
                finally:
                    process.terminate()
                    process.wait(10)
        bare = statistics.median(samples["bare"])
        print(f"uvicorn with {server}:")
        print(f"{'variant':<18} {'requests/s':>11} {'of bare':>8} {'µs added':>9}")
        results[server] = {}
        for name in VARIANTS:
            value = results[server][name] = statistics.median(samples[name])
            added = (1 / value - 1 / bare) * 1e6
            print(f"{name:<18} {value:>11.0f} {value / bare:>8.0%} {added:>9.1f}")
    return results


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
    http.add_argument("--server", choices=[*SERVERS, "both"], default="both")
    args = parser.parse_args()
    if args.mode == "inprocess":
        in_process(args.rounds, args.requests)
    else:
        servers = list(SERVERS) if args.server == "both" else [args.server]
        over_http(args.seconds, args.rounds, args.connections, servers)


def __getattr__(name: str) -> ASGIApp:
    """``benchmarks.peers:BARE``, ``:PEERS``, ``:RESILIENT``...: what the HTTP mode serves."""
    if name.lower() in VARIANTS:
        return variant(name.lower())
    raise AttributeError(name)


if __name__ == "__main__":
    main()
