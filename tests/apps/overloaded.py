"""A slow app behind a concurrency limit, served by uvicorn in tests/test_overload.py.

``/work`` sleeps 50 ms (I/O-bound, as a handler waiting on a database); ``/peak`` reports the
most requests that were inside ``/work`` at once; ``/compute`` spends 20 ms of CPU on the event
loop. Limit 8, queue 8, 0.2 s queue timeout, 0.05 s max lag.
"""

from __future__ import annotations

import time

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from asgi_resilience import resilient

inside = 0
peak = 0


async def work(request: Request) -> PlainTextResponse:
    global inside, peak
    inside += 1
    peak = max(peak, inside)
    try:
        await anyio.sleep(0.05)
    finally:
        inside -= 1
    return PlainTextResponse("done")


async def compute(request: Request) -> PlainTextResponse:
    """20 ms of CPU on the event loop: the wait grows in front of the limit, not inside it."""
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        pass
    return PlainTextResponse("done")


async def report(request: Request) -> JSONResponse:
    return JSONResponse({"peak": peak, "inside": inside})


app = resilient(
    Starlette(routes=[Route("/work", work), Route("/compute", compute), Route("/peak", report)]),
    max_concurrency=8,
    max_queue=8,
    queue_timeout=0.2,
    max_lag=0.05,
    access_log=False,
    environ={},
)
