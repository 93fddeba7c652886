"""The service ``benchmarks/overload.py`` overloads: one route costing about 2 ms of CPU.

``OVERLOAD_VARIANT`` picks the protection: ``none`` (the stack without any), ``fixed`` (our
concurrency limit, ``OVERLOAD_LIMIT`` inside and as many queued for at most 0.25 s) or
``adaptive``. uvicorn's own ``--limit-concurrency`` is the ``none`` app served with that flag.
"""

from __future__ import annotations

import os
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_resilience import resilient

WORK_SECONDS = float(os.environ.get("OVERLOAD_WORK", "0.002"))


def work(request: Request) -> PlainTextResponse:
    """CPU for ``OVERLOAD_WORK`` seconds, in a plain ``def``: Starlette runs it in its thread
    pool, as it runs any blocking handler, so requests overlap as they do in real services
    (an ``async def`` spinning the CPU would block the event loop and never be concurrent)."""
    end = time.perf_counter() + WORK_SECONDS
    while time.perf_counter() < end:  # CPU, as a handler that computes or serializes
        pass
    return PlainTextResponse("done")


variant = os.environ.get("OVERLOAD_VARIANT", "none")
limit = int(os.environ.get("OVERLOAD_LIMIT", "4"))
options: dict[str, object] = {"access_log": False, "environ": {}}
if variant == "fixed":
    options.update(max_concurrency=limit, max_queue=limit, queue_timeout=0.25)
elif variant == "adaptive":
    options.update(max_concurrency="adaptive", queue_timeout=0.25)
app = resilient(Starlette(routes=[Route("/work", work)]), **options)  # type: ignore[arg-type]
