"""A small Starlette service wrapped with ``resilient()``, to try the toolkit by hand.

    python -m asgi_resilience.demo [--host 127.0.0.1] [--port 8000]

Routes: ``GET /items/{item_id}`` (JSON; 404 problem for unknown ids), ``GET /boom`` (raises: a
500 problem that hides the message), ``GET /slow?seconds=1.5`` (logged as slow past 1 s),
``GET /stream`` (a JSON list streamed in chunks, enveloped on the fly). Needs the ``server`` extra
(uvicorn).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .access_log import JsonFormatter
from .envelope import add_envelope_meta
from .exceptions import BadRequest, NotFound
from .request_id import RequestIdLogFilter
from .stack import ResilientApp, resilient

ITEMS = {1: "anvil", 2: "rocket skates", 3: "giant magnet"}
MAX_SLOW_SECONDS = 10.0


async def read_item(request: Request) -> JSONResponse:
    item_id = request.path_params["item_id"]
    if item_id not in ITEMS:
        raise NotFound(f"No item {item_id}", code="item_not_found")
    return JSONResponse({"id": item_id, "name": ITEMS[item_id]})


async def boom(request: Request) -> JSONResponse:
    raise RuntimeError("database password is hunter2")  # never shown outside debug mode


async def slow(request: Request) -> JSONResponse:
    try:
        seconds = float(request.query_params.get("seconds", "1.5"))
    except ValueError:
        raise BadRequest("seconds must be a number") from None
    if not 0 <= seconds <= MAX_SLOW_SECONDS:
        raise BadRequest(f"seconds must be between 0 and {MAX_SLOW_SECONDS:g}")
    await anyio.sleep(seconds)
    return JSONResponse({"slept": seconds})


async def stream(request: Request) -> StreamingResponse:
    add_envelope_meta(count=len(ITEMS))

    async def items() -> AsyncIterator[bytes]:
        yield b"["
        for index, (item_id, name) in enumerate(ITEMS.items()):
            await anyio.sleep(0.05)
            separator = b"," if index else b""
            yield separator + JSONResponse({"id": item_id, "name": name}).body
        yield b"]"

    return StreamingResponse(items(), media_type="application/json")


def create_app() -> ResilientApp:
    """The demo service: a Starlette app wrapped with request ids, logs, errors, envelopes."""
    app = Starlette(
        routes=[
            Route("/items/{item_id:int}", read_item),
            Route("/boom", boom),
            Route("/slow", slow),
            Route("/stream", stream),
        ]
    )
    return resilient(app, envelope=True)


def configure_logging() -> None:
    """JSON lines on stdout, each with the request id: what the demo shows off."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m asgi_resilience.demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        parser.exit(2, "the demo needs uvicorn: pip install 'asgi-resilience[server]'\n")
    configure_logging()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
