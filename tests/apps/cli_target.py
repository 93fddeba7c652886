"""Apps served by ``asgi-resilience run`` in a real subprocess (tests/test_cli.py).

``app`` is a plain Starlette app: the command wraps it with ``resilient()``. ``wrapped`` is one
already wrapped, with options of its own (health at ``/probes``, envelopes on), which the command
must serve as it is. Routes: ``/hello`` (JSON), ``/env`` (the worker's pid, its
``PROMETHEUS_MULTIPROC_DIR`` and the ``CLI_TARGET_*`` variables, after a short pause so that
concurrent requests spread over the workers), ``/slow?seconds=1`` (to be in flight at SIGTERM).
``not_an_app`` is not callable.
"""

from __future__ import annotations

import os

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_resilience import resilient


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


async def slow(request: Request) -> JSONResponse:
    seconds = float(request.query_params.get("seconds", "1"))
    await anyio.sleep(seconds)
    return JSONResponse({"slept": seconds})


async def env(request: Request) -> JSONResponse:
    await anyio.sleep(0.02)
    return JSONResponse(
        {
            "pid": os.getpid(),
            "multiproc_dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
            "variables": {k: v for k, v in os.environ.items() if k.startswith("CLI_TARGET_")},
        }
    )


def routes() -> list[Route]:
    return [Route("/hello", hello), Route("/slow", slow), Route("/env", env)]


app = Starlette(routes=routes())

wrapped = resilient(Starlette(routes=routes()), health_path="/probes", envelope=True, environ={})

not_an_app = 42
