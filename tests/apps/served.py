"""Apps served by a real uvicorn subprocess in tests/test_server.py, configured by environment.

``EVENTS_FILE``: where request and shutdown events are appended, one ``<monotonic> <event>`` per
line. ``SLOW_SECONDS``: how long ``/slow`` takes. ``DRAIN_DELAY``: the lifespan's drain delay.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from asgi_resilience import Lifespan, resilient


def record(event: str) -> None:
    with open(os.environ["EVENTS_FILE"], "a") as events:
        events.write(f"{time.monotonic():.6f} {event}\n")


async def slow(request: Request) -> PlainTextResponse:
    record("request-start")
    await anyio.sleep(float(os.environ.get("SLOW_SECONDS", "1")))
    record("request-end")
    return PlainTextResponse("done")


async def in_flight(request: Request) -> JSONResponse:
    return JSONResponse({"in_flight": draining_lifespan.in_flight})


draining_lifespan = Lifespan(drain_delay=float(os.environ.get("DRAIN_DELAY", "0")))


@draining_lifespan.resource("events", timeout=5)
async def events() -> AsyncIterator[str]:
    record("resource-open")
    yield "events"
    record(f"resource-close in_flight={draining_lifespan.in_flight}")


draining = resilient(
    Starlette(routes=[Route("/slow", slow), Route("/in-flight", in_flight)]),
    lifespan=draining_lifespan,
)

failing_lifespan = Lifespan()


@failing_lifespan.check("payments-api", timeout=1)
async def payments_api() -> None:
    raise ConnectionRefusedError("payments-api refused the connection")


failing = resilient(Starlette(), lifespan=failing_lifespan)
