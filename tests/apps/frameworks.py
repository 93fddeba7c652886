"""The same two endpoints in each framework ``resilient()`` is tried with: ``GET /items/{id}``
answers the id, ``GET /boom`` raises ``RuntimeError`` (each framework turns it into its own 500).

``build(name)`` returns the ASGI app, with its integration installed as documented, and the
route template it reports for ``/items/{id}``, in the framework's own syntax.
"""

from __future__ import annotations

from typing import Any


def litestar() -> tuple[Any, str]:
    from litestar import Litestar, Response, get
    from litestar.params import FromPath

    from asgi_resilience.integrations.litestar import after_exception

    @get("/items/{item_id:int}")
    async def item(item_id: FromPath[int]) -> dict[str, int]:
        return {"item": item_id}

    @get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    class Conflict(Exception):
        pass

    @get("/conflict")
    async def conflict() -> None:
        raise Conflict("taken")

    def to_409(request: Any, exc: Exception) -> Response[dict[str, str]]:
        return Response({"detail": "taken"}, status_code=409)

    # logging_config=None: Litestar's default dictConfig would take over the root logger.
    app = Litestar(
        [item, boom, conflict],
        after_exception=[after_exception],
        exception_handlers={Conflict: to_409},
        logging_config=None,
    )
    return app, "/items/{item_id}"  # the template without its type


def quart() -> tuple[Any, str]:
    from quart import Quart

    from asgi_resilience.integrations.quart import install

    app = Quart(__name__)

    @app.get("/items/<int:item_id>")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.get("/boom")
    async def boom() -> dict[str, int]:
        raise RuntimeError("kaboom")

    return install(app), "/items/<int:item_id>"


def django() -> tuple[Any, str]:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF="tests.apps.django_urls",
            MIDDLEWARE=["asgi_resilience.integrations.django.RouteMiddleware"],
            SECRET_KEY="tests-only",
            LOGGING_CONFIG=None,
        )
        django.setup()
    from django.core.asgi import get_asgi_application

    return get_asgi_application(), "/items/<int:item_id>"


def falcon() -> tuple[Any, str]:
    import falcon.asgi

    from asgi_resilience.integrations.falcon import install

    class Item:
        async def on_get(self, req: Any, resp: Any, item_id: str) -> None:
            resp.media = {"item": int(item_id)}

    class Boom:
        async def on_get(self, req: Any, resp: Any) -> None:
            raise RuntimeError("kaboom")

    app = falcon.asgi.App()
    app.add_route("/items/{item_id}", Item())
    app.add_route("/boom", Boom())
    return install(app), "/items/{item_id}"


def blacksheep() -> tuple[Any, str]:
    from blacksheep import Application, json

    from asgi_resilience.integrations.blacksheep import install

    app = Application()

    @app.router.get("/items/{item_id}")
    async def item(item_id: int) -> Any:
        return json({"item": item_id})

    @app.router.get("/boom")
    async def boom() -> Any:
        raise RuntimeError("kaboom")

    return install(app), "/items/{item_id}"


FRAMEWORKS = {
    "litestar": litestar,
    "quart": quart,
    "django": django,
    "falcon": falcon,
    "blacksheep": blacksheep,
}


def build(name: str) -> tuple[Any, str]:
    return FRAMEWORKS[name]()


# uvicorn --factory targets: each framework's app wrapped by the stack, for real servers.
def served(name: str) -> Any:
    from asgi_resilience import resilient

    app, _ = build(name)
    return resilient(app)


def litestar_served() -> Any:
    return served("litestar")


def quart_served() -> Any:
    return served("quart")


def django_served() -> Any:
    return served("django")


def falcon_served() -> Any:
    return served("falcon")


def blacksheep_served() -> Any:
    return served("blacksheep")
