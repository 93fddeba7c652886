"""Helpers to drive ASGI applications: directly, message by message (``call``), or through an
httpx client (``client_for``); the small Starlette and FastAPI apps several test modules drive;
``wait_until`` for a condition other tasks make true.

Servers in subprocesses are in ``tests/servers.py``; test doubles in ``tests/fakes.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio.lowlevel
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import BaseRoute, Route

from asgi_resilience.types import ASGIApp, Message, Scope

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI

    from asgi_resilience import Lifespan


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    headers: Sequence[tuple[bytes, bytes]] = (),
    query_string: bytes = b"",
    extensions: dict[str, Any] | None = None,
) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query_string,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


class Response:
    """The messages an application sent for one request, and what they add up to."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one http.response.start, got {len(starts)}"
        return starts[0]

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.start["headers"]}

    def header_list(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.start["headers"] if k.lower() == key]

    @property
    def body_messages(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.body_messages)

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: ASGIApp,
    scope: Scope | None = None,
    *,
    body: bytes = b"",
    receive: Callable[[], Awaitable[Message]] | None = None,
) -> Response:
    """Run one request through ``app`` and return what it sent."""
    messages: list[Message] = []
    sent_request = False

    async def default_receive() -> Message:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope if scope is not None else http_scope(), receive or default_receive, send)
    return Response(messages)


def layers(app: object) -> list[object]:
    """The layers from ``app`` inwards (``ResilientApp.stack``, each middleware's ``app``), the
    observers an ``Observers`` runs in one pass listed in its place, in their order."""
    from asgi_resilience.observe import Observers

    found: list[object] = []
    layer: object | None = app
    while layer is not None:
        if isinstance(layer, Observers):
            found.extend(layer.observers)
        else:
            found.append(layer)
        layer = getattr(layer, "stack", None) or getattr(layer, "app", None)
    return found


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    """An httpx client calling ``app`` in this process, at ``http://testserver``."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def wait_until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition()`` holds (no clock involved: checkpoints only)."""
    for _ in range(10_000):
        if condition():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition never became true")


# -- the apps several modules drive ------------------------------------------------------------

item_logger = logging.getLogger("tests.items")


class Declined(Exception):
    """The error the apps below raise (metrics and spans name it by its type)."""


async def read_item(request: Request) -> PlainTextResponse:
    item_id = request.path_params["item_id"]
    item_logger.info("looking up item %s", item_id)
    return PlainTextResponse(f"item {item_id}")


async def fail(request: Request) -> PlainTextResponse:
    raise Declined("card declined")


async def broken_stream(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b"first part"
        raise Declined("stream broke")

    return StreamingResponse(body(), media_type="text/plain")


async def read_state(request: Request) -> JSONResponse:
    return JSONResponse({"value": getattr(request.state, request.path_params["name"])})


def item_routes() -> list[BaseRoute]:
    """``/items/{item_id}`` (``item <id>`` as text, logged on ``tests.items``), ``/fail``
    (raises ``Declined``), ``/stream`` (``first part``, then raises ``Declined``) and
    ``/state/{name}`` (``{"value": request.state.<name>}``, what a lifespan put there)."""
    return [
        Route("/items/{item_id}", read_item),
        Route("/fail", fail),
        Route("/stream", broken_stream),
        Route("/state/{name}", read_state),
    ]


def starlette_app(lifespan: Lifespan | None = None) -> Starlette:
    """A Starlette app of ``item_routes()``, with ``lifespan`` if given."""
    return Starlette(routes=item_routes(), lifespan=lifespan)


def add_item_endpoints(router: FastAPI | APIRouter) -> None:
    """``/items/{item_id}`` (``item_id`` an int) and ``/fail`` as FastAPI routes."""

    @router.get("/items/{item_id}", response_class=PlainTextResponse)
    async def get_item(item_id: int) -> str:
        return f"item {item_id}"

    @router.get("/fail")
    async def get_fail() -> None:
        raise Declined("card declined")


def fastapi_app() -> FastAPI:
    """A FastAPI app of ``add_item_endpoints``."""
    from fastapi import FastAPI

    app = FastAPI()
    add_item_endpoints(app)
    return app
