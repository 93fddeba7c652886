"""An app limited through Redis, served by several uvicorn workers in test_ratelimit_redis.py.

Configured by environment: ``REDIS_URL``, ``RATE_LIMIT_PREFIX`` (the test's own key prefix),
``RATE_LIMIT`` (``"100/day"`` by default). Every response names the worker that sent it in
``X-Worker-PID``, rate limited or not.
"""

from __future__ import annotations

import os

import redis.asyncio as redis_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_resilience import Lifespan, resilient
from asgi_resilience.ratelimit import RateLimitMiddleware
from asgi_resilience.ratelimit.redis import RedisBackend
from asgi_resilience.types import Message, Receive, Scope, Send


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


# A pool that waits for a free connection: redis-py's default one fails at once beyond 100
# connections in use, and a burst of more concurrent requests per worker would then fail.
pool = redis_asyncio.BlockingConnectionPool.from_url(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), max_connections=32
)
backend = RedisBackend(
    redis_asyncio.Redis.from_pool(pool),
    prefix=os.environ.get("RATE_LIMIT_PREFIX", "test:asgi_resilience:served:"),
)
lifespan = Lifespan()
lifespan.add_resource("redis", backend.aclose, timeout=2)
limited = resilient(
    RateLimitMiddleware(
        Starlette(routes=[Route("/", hello)]),
        limit=os.environ.get("RATE_LIMIT", "100/day"),
        backend=backend,
        # Under a burst the decisions queue behind each other; a failure must never admit.
        backend_timeout=5,
        on_backend_error="deny",
    ),
    lifespan=lifespan,
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
