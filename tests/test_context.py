from __future__ import annotations

import gc
import math
import re
from datetime import datetime, timezone

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router

from asgi_resilience._routes import _route_tables
from asgi_resilience.context import (
    CONTEXT_KEY,
    UNMATCHED_ROUTE,
    ContextMiddleware,
    RequestContext,
    format_timestamp,
    route_template,
    utc_timestamp,
)
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send
from tests.asgi import call, client_for, http_scope

pytestmark = pytest.mark.anyio


class RouteProbe(ContextMiddleware):
    """Records the context and the route template each request ended with."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.routes: list[str] = []
        self.contexts: list[RequestContext] = []

    async def handle(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        await self.app(scope, receive, context.record(send))
        self.routes.append(context.route(scope))
        self.contexts.append(context)


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def routes_for(app: ASGIApp, *requests: tuple[str, str]) -> list[str]:
    probe = RouteProbe(app)
    async with client_for(probe) as client:
        for method, path in requests:
            await client.request(method, path)
    return probe.routes


async def test_starlette_route_templates_drop_converters_and_join_mounts() -> None:
    static = Mount("/static", app=PlainTextResponse("file"))
    app = Starlette(
        routes=[
            Route("/items/{item_id:int}", ok),
            Mount(
                "/api",
                routes=[Mount("/v1", routes=[Route("/users/{user_id}", ok, methods=["GET"])])],
            ),
            Mount("/sub", app=Starlette(routes=[Route("/things/{thing_id}", ok)])),
            static,
        ]
    )
    routes = await routes_for(
        app,
        ("GET", "/items/1"),
        ("GET", "/items/2"),
        ("GET", "/api/v1/users/7"),
        ("POST", "/api/v1/users/7"),  # 405: the route still names the template
        ("GET", "/api/v1/nothing"),  # inside a mount, nothing matched
        ("GET", "/sub/things/x"),
        ("GET", "/static/css/site.css"),  # an opaque mounted app
        ("GET", "/nowhere"),
    )
    assert routes == [
        "/items/{item_id}",
        "/items/{item_id}",
        "/api/v1/users/{user_id}",
        "/api/v1/users/{user_id}",
        UNMATCHED_ROUTE,
        "/sub/things/{thing_id}",
        "/static/{path}",
        UNMATCHED_ROUTE,
    ]


async def test_host_routes_add_no_path() -> None:
    app = Starlette(routes=[Host("api.example.com", app=Router([Route("/v/{n}", ok)]))])
    probe = RouteProbe(app)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=probe), base_url="http://api.example.com"
    ) as client:
        await client.get("/v/1")
    assert probe.routes == ["/v/{n}"]


async def test_fastapi_routers_and_mounted_apps() -> None:
    router = APIRouter(prefix="/items")

    @router.get("/{item_id}")
    async def read_item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    sub = FastAPI()

    @sub.get("/orders/{order_id}")
    async def read_order(order_id: str) -> dict[str, str]:
        return {"order_id": order_id}

    app = FastAPI()
    app.include_router(router, prefix="/api")
    app.mount("/shop", sub)
    routes = await routes_for(
        app, ("GET", "/api/items/3"), ("GET", "/shop/orders/a1"), ("GET", "/nope")
    )
    assert routes == ["/api/items/{item_id}", "/shop/orders/{order_id}", UNMATCHED_ROUTE]


async def test_fastapi_nested_includes_and_late_includes() -> None:
    items = APIRouter(prefix="/items")

    @items.get("/{item_id}")
    async def read_item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    version = APIRouter()
    version.include_router(items, prefix="/v1")
    app = FastAPI()
    app.include_router(version, prefix="/api")
    late = APIRouter()

    @late.get("/late/{n}")
    async def read_late(n: int) -> dict[str, int]:
        return {"n": n}

    probe = RouteProbe(app)
    async with client_for(probe) as client:
        await client.get("/api/v1/items/1")
        app.include_router(late, prefix="/x")
        await client.get("/x/late/2")
    assert probe.routes == ["/api/v1/items/{item_id}", "/x/late/{n}"]


async def test_route_added_after_the_table_was_built() -> None:
    app = Starlette(routes=[Route("/a", ok)])
    probe = RouteProbe(app)
    async with client_for(probe) as client:
        await client.get("/a")
        app.router.routes.append(Route("/b/{x}", ok))
        await client.get("/b/1")
    assert probe.routes == ["/a", "/b/{x}"]


def test_string_route_and_missing_route() -> None:
    assert route_template({"route": "/custom/{id}"}) == "/custom/{id}"
    assert route_template({"route": ""}) == UNMATCHED_ROUTE
    assert route_template({}) == UNMATCHED_ROUTE


def test_route_without_router_and_unknown_route_types() -> None:
    assert route_template({"route": Route("/x/{y:int}", ok)}) == "/x/{y}"
    assert route_template({"route": object(), "router": None}) == UNMATCHED_ROUTE


def test_route_table_goes_away_with_its_router() -> None:
    router = Router([Route("/gone", ok)])
    route = router.routes[0]
    assert route_template({"route": route, "router": router}) == "/gone"
    key = id(router)
    assert key in _route_tables
    del router, route
    gc.collect()
    assert key not in _route_tables


async def test_first_layer_creates_the_context_and_inner_layers_share_it() -> None:
    inner_seen: list[RequestContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        inner_seen.append(scope[CONTEXT_KEY])
        assert RequestContext.current() is scope[CONTEXT_KEY]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.body", "body": b"de"})

    inner = RouteProbe(app)
    outer = RouteProbe(inner)
    await call(outer)
    [context] = inner_seen
    assert outer.contexts == [context] and inner.contexts == [context]
    assert context.status == 200
    assert context.bytes_sent == 5
    assert context.complete
    assert context.response_started is not None and context.response_ended is not None
    assert context.start <= context.response_started <= context.response_ended
    assert RequestContext.current() is None


async def test_record_counts_pathsend_bytes_from_content_length() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"1234"), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.pathsend", "path": "/dev/null"})

    probe = RouteProbe(app)
    await call(probe)
    assert probe.contexts[0].bytes_sent == 1234
    assert probe.contexts[0].complete


async def test_record_marks_a_failed_send_as_a_disconnect() -> None:
    context = RequestContext(http_scope())

    async def broken_send(message: Message) -> None:
        raise OSError("connection reset")

    send = context.record(broken_send)
    assert context.record(send) is send  # recording is installed once
    with pytest.raises(OSError):
        await send({"type": "http.response.start", "status": 200, "headers": []})
    assert context.disconnected
    assert not context.complete


def test_bad_content_length_counts_as_zero_bytes() -> None:
    from asgi_resilience.context import _content_length

    assert _content_length([(b"Content-Length", b"12")]) == 12
    assert _content_length([(b"content-length", b"twelve")]) == 0
    assert _content_length([]) == 0


def test_timestamps_are_iso_utc_with_milliseconds() -> None:
    stamp = utc_timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert abs((parsed - datetime.now(timezone.utc)).total_seconds()) < 5
    assert format_timestamp(0.25) == "1970-01-01T00:00:00.250Z"
    assert format_timestamp(86400.999) == "1970-01-02T00:00:00.999Z"
    assert format_timestamp(0.5) == "1970-01-01T00:00:00.500Z"  # cached second changed back


async def test_non_http_scopes_get_no_context() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    async def receive() -> Message:
        raise AssertionError

    async def send(message: Message) -> None:
        raise AssertionError

    await RouteProbe(app)({"type": "lifespan"}, receive, send)
    assert CONTEXT_KEY not in seen[0]


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.25, "1970-01-01T00:00:00.250Z"),
        (1_700_000_000.0, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.9994, "2023-11-14T22:13:20.999Z"),
        (1_700_000_000.99999, "2023-11-14T22:13:20.999Z"),
        (1_700_000_001.0004, "2023-11-14T22:13:21.000Z"),
        (1_699_999_999.5, "2023-11-14T22:13:19.500Z"),  # an earlier second after a later one
        (-0.25, "1969-12-31T23:59:59.750Z"),  # a clock before 1970: down, not toward zero
        (-1.5, "1969-12-31T23:59:58.500Z"),
    ],
)
def test_format_timestamp_at_the_edges_of_a_second(seconds: float, expected: str) -> None:
    import asgi_resilience._timestamps as timestamps

    timestamps._timestamp_cache = (math.inf, "")  # nothing cached yet, as at import
    assert format_timestamp(seconds) == expected
    assert format_timestamp(seconds) == expected  # from the cache
