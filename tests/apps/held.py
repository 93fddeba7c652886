"""A service whose requests can be held in flight, served by real ``asgi-resilience run``
processes in tests/test_multiprocess.py and tests/test_dashboard.py.

``GET /hold`` appends the serving process's id to ``HELD_FILE`` (a line per request), then
answers only once ``RELEASE_FILE`` exists (at most 30 s). ``/pid`` answers the process id,
``/fail`` raises (a 500), ``/search`` calls through the ``search`` circuit breaker and
``/limited`` allows two requests a minute. The lifespan has a resource (``pool``), a check
(``database``) and a background task (``poller``), so that startup, shutdown and task metrics
have something to show.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_resilience import CircuitBreaker, Lifespan, resilient

HOLD_SECONDS = 30.0
POLL_SECONDS = 0.02

lifespan = Lifespan(drain_delay=0)
search_breaker = CircuitBreaker("search")


@lifespan.resource("pool")
async def pool() -> AsyncIterator[str]:
    yield "pool"


@lifespan.check("database", timeout=1)
async def database() -> None:
    pass


@lifespan.task("poller", every=0.5)
async def poller() -> None:
    pass


async def pid(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


async def hold(request: Request) -> PlainTextResponse:
    async with await anyio.open_file(os.environ["HELD_FILE"], "a") as held:
        await held.write(f"{os.getpid()}\n")
    release = anyio.Path(os.environ["RELEASE_FILE"])
    for _ in range(int(HOLD_SECONDS / POLL_SECONDS)):
        if await release.exists():
            break
        await anyio.sleep(POLL_SECONDS)  # released by another process: no event to wait on
    return PlainTextResponse(str(os.getpid()))


async def fail(request: Request) -> PlainTextResponse:
    raise RuntimeError("failing on purpose")


async def search(request: Request) -> PlainTextResponse:
    async def query() -> str:
        return "found"

    return PlainTextResponse(await search_breaker.call(query))


async def limited(request: Request) -> PlainTextResponse:
    return PlainTextResponse("allowed")


app = resilient(
    Starlette(
        routes=[
            Route("/pid", pid),
            Route("/hold", hold),
            Route("/fail", fail),
            Route("/search", search),
            Route("/limited", limited),
        ]
    ),
    lifespan=lifespan,
    rate_limit="1000/second",
    rate_limit_routes={"/limited": "2/minute"},
)
