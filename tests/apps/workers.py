"""A worker's lifespan (checks, resources, tasks) served by real processes in tests/test_worker.py.

``EVENTS_FILE``: where events are appended, one ``<monotonic> <event>`` per line (the drain is
one too: a log handler records the lifespan's "Draining" line). ``FAIL_CHECK=1``: the critical
check fails. ``HANG_CLOSE=1``: a resource between the other two whose close shields itself from
cancellation and never returns, not even when the event loop cancels it at its end.
``SHUTDOWN_TIMEOUT``, ``DRAIN_DELAY``: the lifespan's.
``ON_UNHANDLED``: the lifespan's ``on_unhandled``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_resilience import Lifespan, resilient


def record(event: str) -> None:
    with open(os.environ["EVENTS_FILE"], "a") as events:
        events.write(f"{time.monotonic():.6f} {event}\n")


class _DrainRecorder(logging.Handler):
    def emit(self, record_: logging.LogRecord) -> None:
        if record_.getMessage().startswith("Draining"):
            record("drain")


_lifespan_logger = logging.getLogger("asgi_resilience.lifespan")
_lifespan_logger.addHandler(_DrainRecorder())
_lifespan_logger.setLevel(logging.INFO)  # the "Draining" line is INFO
if not logging.getLogger().handlers:  # plain uvicorn: the lifespan's report on stderr too
    _lifespan_logger.addHandler(logging.StreamHandler())

lifespan = Lifespan(
    drain_delay=float(os.environ.get("DRAIN_DELAY", "0")),
    shutdown_timeout=float(os.environ.get("SHUTDOWN_TIMEOUT", "10")),
    on_unhandled=os.environ.get("ON_UNHANDLED", "log"),  # type: ignore[arg-type]
)
closed: set[str] = set()


@lifespan.check("broker")
async def broker() -> None:
    if os.environ.get("FAIL_CHECK") == "1":
        raise ConnectionError("broker unreachable")
    record("check passed")


@lifespan.resource("early")
async def early() -> AsyncIterator[str]:
    yield "early"
    closed.add("early")
    record("close early")


if os.environ.get("HANG_CLOSE") == "1":

    async def hang() -> None:
        record("close stuck: hanging")
        while True:  # shielded, and deaf even to the event loop's last cancellation
            try:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep_forever()
            except BaseException:  # the point: a close that will not stop
                continue

    lifespan.add_resource("stuck", hang, timeout=30)


@lifespan.resource("store")
async def store() -> AsyncIterator[str]:
    yield "store"
    closed.add("store")
    record("close store")


@lifespan.task("consumer", critical=True, timeout=2)
async def consumer() -> None:
    record("task started")
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.05)  # acknowledging what it consumed: the store is needed
        record(f"task cancelled, store open={'store' not in closed}")


@lifespan.task("sweeper", every=0.1)
async def sweeper() -> None:
    pass


async def slow(request: Request) -> PlainTextResponse:
    record("request start")
    await anyio.sleep(float(request.query_params.get("seconds", "1")))
    record("request end")
    return PlainTextResponse("done")


async def thread_crash(request: Request) -> PlainTextResponse:
    threading.Thread(target=lambda: 1 / 0, name="poller").start()
    return PlainTextResponse("started")


@asynccontextmanager
async def own_lifespan(app: Starlette) -> AsyncIterator[None]:
    """The application's own lifespan, kept by the stack around it."""
    record("app startup")
    yield
    record("app shutdown")


api = resilient(
    Starlette(
        routes=[Route("/slow", slow), Route("/thread-crash", thread_crash)],
        lifespan=own_lifespan,
    ),
    lifespan=lifespan,
)
