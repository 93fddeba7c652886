"""Application factories and bad targets for ``asgi-resilience --factory`` (test_cli_options.py).

``create_app`` builds a Starlette app whose ``Lifespan`` has a startup check ``factory-db``;
``/made`` answers the pid of the process that called the factory, how many times this process
called it, and the request's ``root_path``. ``create_lifespan`` returns a ``Lifespan`` (for
``worker --factory``). The others are refused: ``create_app_async`` (a coroutine function),
``returns_none``, ``needs_settings`` (takes an argument), ``raises`` (fails when called),
``Component`` (a class), ``takes_two`` (a function with the wrong signature); ``app`` is an
ASGI app given ``--factory``.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_resilience import Lifespan

calls = 0


async def made(request: Request) -> JSONResponse:
    return JSONResponse(
        {"pid": os.getpid(), "calls": calls, "root_path": request.scope.get("root_path")}
    )


def create_app() -> Starlette:
    global calls
    calls += 1
    lifespan = Lifespan()

    @lifespan.check("factory-db", timeout=1)
    async def factory_db() -> None:
        pass

    return Starlette(routes=[Route("/made", made)], lifespan=lifespan)


def create_lifespan() -> Lifespan:
    return Lifespan()


async def create_app_async() -> Starlette:
    return Starlette()


def returns_none() -> None:
    return None


def needs_settings(settings: dict[str, str]) -> Starlette:
    return Starlette()


def raises() -> Starlette:
    raise RuntimeError("DATABASE_URL is not set")


class Component:
    async def __call__(self, scope: object, receive: object, send: object) -> None:
        pass


def takes_two(scope: object, receive: object) -> None:
    pass


app = Starlette()
