"""Apps with startup checks for ``asgi-resilience check`` (tests/test_cli.py).

Each attribute has a ``Lifespan`` of its own: ``passing`` (a ``resilient()`` app whose check
passes), ``failing`` (a critical check raising), ``hanging`` and ``hanging_sync`` (a critical check
that never returns, async or in a thread, with ``timeout=0.5``), ``degraded`` (a non-critical check
failing next to a passing one), ``starlette_app`` (``Starlette(lifespan=lifespan)``, the
lifespan given to the framework) and ``plain`` (no checks at all).
"""

from __future__ import annotations

import time

import anyio
from starlette.applications import Starlette

from asgi_resilience import Lifespan, resilient

passing_lifespan = Lifespan()


@passing_lifespan.check("database", timeout=1)
async def database() -> None:
    pass


passing = resilient(Starlette(), lifespan=passing_lifespan, environ={})

failing_lifespan = Lifespan()


@failing_lifespan.check("payments-api", timeout=1)
async def payments_api() -> None:
    raise ConnectionRefusedError("payments-api refused the connection")


failing = resilient(Starlette(), lifespan=failing_lifespan, environ={})

hanging_lifespan = Lifespan()


@hanging_lifespan.check("search", timeout=0.5)
async def search() -> None:
    await anyio.sleep(60)


hanging = resilient(Starlette(), lifespan=hanging_lifespan, environ={})

hanging_sync_lifespan = Lifespan()


@hanging_sync_lifespan.check("legacy-driver", timeout=0.5)
def legacy_driver() -> None:
    time.sleep(30)  # a blocking client without a timeout of its own


hanging_sync = resilient(Starlette(), lifespan=hanging_sync_lifespan, environ={})

degraded_lifespan = Lifespan()


@degraded_lifespan.check("cache", timeout=1, critical=False)
async def cache() -> None:
    raise TimeoutError("cache did not answer")


@degraded_lifespan.check("database", timeout=1)
async def degraded_database() -> None:
    pass


degraded = resilient(Starlette(), lifespan=degraded_lifespan, environ={})

framework_lifespan = Lifespan()


@framework_lifespan.check("queue", timeout=1)
async def queue() -> bool:
    return True


starlette_app = Starlette(lifespan=framework_lifespan)

plain = Starlette()
