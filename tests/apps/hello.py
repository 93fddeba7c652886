"""A plain Starlette app for ``asgi-resilience run`` in tests/test_access_log_sink.py: the CLI
wraps it, its access log through a ``JsonLinesSink`` on stdout."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


app = Starlette(routes=[Route("/hello", hello)])
