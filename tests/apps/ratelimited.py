"""An app limited through Redis, served by several uvicorn workers in test_ratelimit_redis.py.

Configured by environment: ``REDIS_URL``, ``RATE_LIMIT_PREFIX`` (the test's own key prefix),
``RATE_LIMIT`` (``"100/day"`` by default). Every response names the worker that sent it in
``X-Worker-PID``, rate limited or not.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_resilience import Lifespan, resilient
from asgi_resilience.ratelimit.redis import RedisBackend
from asgi_resilience.types import Message, Receive, Scope, Send


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


# The defaults a production user has: a URL, the default timeout; only the key prefix is the
# test's own. ``RATE_LIMIT_ON_ERROR=deny`` makes any backend failure visible as a 503.
backend = RedisBackend.from_url(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    prefix=os.environ.get("RATE_LIMIT_PREFIX", "test:asgi_resilience:served:"),
)
lifespan = Lifespan()
lifespan.add_resource("redis", backend.aclose, timeout=2)
lifespan.add_check("redis", backend.ping, timeout=2)
limited = resilient(
    Starlette(routes=[Route("/", hello), Route("/items/{item_id}", hello)]),
    lifespan=lifespan,
    rate_limit=os.environ.get("RATE_LIMIT", "100/day"),
    rate_limit_backend=backend,
    rate_limit_on_backend_error="deny" if os.environ.get("RATE_LIMIT_ON_ERROR") else "allow",
)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        await limited(scope, receive, send)
        return
    pid = str(os.getpid()).encode()

    async def send_with_worker_pid(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message["headers"], (b"x-worker-pid", pid)]}
        await send(message)

    await limited(scope, receive, send_with_worker_pid)
