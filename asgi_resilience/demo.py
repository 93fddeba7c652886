"""A small Starlette service wrapped with ``resilient()``, to try the toolkit by hand.

    asgi-resilience demo [--host 127.0.0.1] [--port 8000]      (or: make demo)

Items live in SQLite (through ``asgi_resilience.sqlalchemy.Database``: a startup check, pool
stats at ``/health/status``, dispose at shutdown); rate limits use the memory backend. Routes:
``GET /items/{item_id}`` (JSON; a 404 problem for unknown ids), ``GET /boom`` (raises: a 500
problem that hides the message), ``GET /slow?seconds=1.5`` (logged as slow past 1 s),
``GET /stream`` (a JSON list streamed in chunks, enveloped on the fly), plus ``/health/*`` and
``/metrics``. Needs the ``sqlalchemy`` and ``server`` extras.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .envelope import add_envelope_meta
from .exceptions import BadRequest, NotFound
from .lifespan import Lifespan
from .stack import ResilientApp, resilient

ITEMS = {1: "anvil", 2: "rocket skates", 3: "giant magnet"}
MAX_SLOW_SECONDS = 10.0


def create_app(database_url: str | None = None) -> ResilientApp:
    """The demo service on SQLite (a file in the temp directory unless ``database_url``)."""
    try:
        from sqlalchemy import text

        from .sqlalchemy import Database
    except ImportError:
        raise ImportError(
            "the demo needs SQLAlchemy: pip install 'asgi-resilience[sqlalchemy,server]'"
        ) from None
    path = os.path.join(tempfile.gettempdir(), f"asgi-resilience-demo-{os.getpid()}.db")
    db: Database[Any] = Database(database_url or f"sqlite+aiosqlite:///{path}", name="sqlite")
    lifespan = Lifespan()
    db.install(lifespan)

    @lifespan.resource("items", timeout=5)
    async def items_table() -> AsyncIterator[str]:
        async with db.transaction() as session:
            await session.execute(text("DROP TABLE IF EXISTS items"))
            await session.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)"))
            for item_id, name in ITEMS.items():
                await session.execute(
                    text("INSERT INTO items (id, name) VALUES (:id, :name)"),
                    {"id": item_id, "name": name},
                )
        yield "items"
        if database_url is None:
            os.unlink(path)

    async def read_item(request: Request) -> JSONResponse:
        item_id = request.path_params["item_id"]
        async with db.session() as session:
            result = await session.execute(
                text("SELECT name FROM items WHERE id = :id"), {"id": item_id}
            )
            name = result.scalar()
        if name is None:
            raise NotFound(f"No item {item_id}", code="item_not_found")
        return JSONResponse({"id": item_id, "name": name})

    app = Starlette(
        routes=[
            Route("/items/{item_id:int}", read_item),
            Route("/boom", boom),
            Route("/slow", slow),
            Route("/stream", stream),
        ]
    )
    return resilient(
        app,
        lifespan=lifespan,
        envelope=True,
        rate_limit="50/second",
        health_status_details=True,
        version="demo",
    )


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


def main(argv: list[str] | None = None) -> None:
    """``python -m asgi_resilience.demo``: the same as ``asgi-resilience demo``."""
    from .cli import main as cli_main

    parser = argparse.ArgumentParser(prog="python -m asgi_resilience.demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    raise SystemExit(cli_main(["demo", "--host", args.host, "--port", str(args.port)]))


if __name__ == "__main__":
    main()
