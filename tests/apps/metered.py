"""An app served by several uvicorn workers in Prometheus multiprocess mode (test_metrics.py).

Run it with ``PROMETHEUS_MULTIPROC_DIR`` in the environment: prometheus_client chooses its
multiprocess value class when it is first imported, so the variable must be set before this
module (and so the package) is loaded; uvicorn's spawned workers inherit it. Every worker
writes its samples to files there and any worker's ``/metrics`` sums them all.

``/pid`` answers the id of the worker process that served it, after a short pause so that
concurrent requests spread over the workers. ``/health/ready`` runs the ``always-up`` check,
which sets the ``asgi_resilience_health_check_up`` gauge (a live gauge: one file per worker).
"""

from __future__ import annotations

import os

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_resilience import Lifespan, resilient


async def pid(request: Request) -> PlainTextResponse:
    await anyio.sleep(0.02)
    return PlainTextResponse(str(os.getpid()))


lifespan = Lifespan()


@lifespan.check("always-up", timeout=1)
async def always_up() -> None:
    pass


app = resilient(Starlette(routes=[Route("/pid", pid)]), lifespan=lifespan)
