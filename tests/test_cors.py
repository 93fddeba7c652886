"""``resilient(cors=...)``: Starlette's CORSMiddleware outermost, so the stack's own answers
(500, 429, 503, 404) carry the CORS headers too."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from asgi_resilience import CircuitOpenError, ResilientApp, resilient
from tests.asgi import client_for

pytestmark = pytest.mark.anyio

ORIGIN = "https://a.example"
CORS = {"allow_origins": [ORIGIN]}


async def ok(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def boom(request: Request) -> JSONResponse:
    raise RuntimeError("boom")


async def circuit(request: Request) -> JSONResponse:
    raise CircuitOpenError("payments", retry_after=2)


async def held(request: Request) -> JSONResponse:
    await request.app.state.release.wait()
    return JSONResponse({"held": True})


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


def service(**options: Any) -> ResilientApp:
    app = Starlette(
        routes=[
            Route("/ok", ok),
            Route("/boom", boom),
            Route("/circuit", circuit),
            Route("/held", held),
            WebSocketRoute("/ws", echo),
        ]
    )
    return resilient(app, cors=CORS, environ={}, access_log=False, **options)


def assert_cors(response: httpx.Response) -> None:
    assert response.headers.get("access-control-allow-origin") == ORIGIN, response.headers
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize(("path", "status"), [("/boom", 500), ("/circuit", 503), ("/no", 404)])
async def test_errors_rendered_by_the_stack_carry_the_cors_headers(path: str, status: int) -> None:
    async with client_for(service()) as client:
        response = await client.get(path, headers={"origin": ORIGIN})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert_cors(response)


async def test_a_burst_of_429s_each_carries_the_cors_headers() -> None:
    app = service(rate_limit="50/minute")
    async with client_for(app) as client:
        responses = await _burst(client, "/ok", 300)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 50 and statuses.count(429) == 250
    for response in responses:
        assert_cors(response)
    limited = next(r for r in responses if r.status_code == 429)
    exposed = limited.headers["access-control-expose-headers"].lower()
    assert "retry-after" in exposed and "ratelimit" in exposed.split(", ")


async def test_load_shed_503s_carry_the_cors_headers() -> None:
    app = service(max_concurrency=2, max_queue=0)
    app.app.state.release = anyio.Event()  # type: ignore[attr-defined]
    async with client_for(app) as client, anyio.create_task_group() as group:
        held_responses: list[httpx.Response] = []

        async def hold() -> None:
            held_responses.append(await client.get("/held", headers={"origin": ORIGIN}))

        group.start_soon(hold)
        group.start_soon(hold)
        while app.lifespan.in_flight < 2:
            await anyio.lowlevel.checkpoint()
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        shed = await _burst(client, "/held", 100)
        app.app.state.release.set()  # type: ignore[attr-defined]
    assert {r.status_code for r in shed} == {503}
    for response in [*shed, *held_responses]:
        assert_cors(response)
    assert [r.status_code for r in held_responses] == [200, 200]


async def test_a_preflight_is_answered_by_starlettes_cors_middleware() -> None:
    async with client_for(service(rate_limit="1/minute")) as client:
        preflights = [
            await client.options(
                "/ok",
                headers={"origin": ORIGIN, "access-control-request-method": "GET"},
            )
            for _ in range(3)
        ]
        refused = await client.options(
            "/ok",
            headers={"origin": "https://evil.example", "access-control-request-method": "GET"},
        )
    for preflight in preflights:  # answered before the limit: never 429
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "GET" in preflight.headers["access-control-allow-methods"]
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


async def test_another_origin_gets_no_cors_headers_but_the_same_answer() -> None:
    async with client_for(service()) as client:
        response = await client.get("/boom", headers={"origin": "https://evil.example"})
    assert response.status_code == 500
    assert "access-control-allow-origin" not in response.headers


async def test_expose_headers_given_are_used_as_given() -> None:
    app = resilient(
        Starlette(routes=[Route("/ok", ok)]),
        cors={"allow_origins": [ORIGIN], "expose_headers": ["X-Total"]},
        environ={},
    )
    async with client_for(app) as client:
        response = await client.get("/ok", headers={"origin": ORIGIN})
    assert response.headers["access-control-expose-headers"] == "X-Total"


def test_websockets_pass_through_the_cors_layer() -> None:
    with TestClient(service()) as client, client.websocket_connect("/ws") as websocket:
        websocket.send_text("hello")
        assert websocket.receive_text() == "hello"


@pytest.mark.parametrize(
    ("cors", "message"),
    [
        ("https://a.example", "cors must be a dict of CORSMiddleware options"),
        ({"allow_origin": [ORIGIN]}, "unknown CORSMiddleware option 'allow_origin'"),
        ({"allow_origins": ORIGIN}, r"cors\['allow_origins'\] must be a list"),
        ({"allow_origins": [ORIGIN], "allow_methods": [1]}, "entries must be strings"),
        ({"allow_methods": ["GET"]}, "cors allows no origin"),
        ({"allow_origins": ["https://a.example/"]}, "can never match a browser's Origin"),
        ({"allow_origins": ["a.example"]}, "give scheme://host"),
        ({"allow_origins": [ORIGIN], "allow_credentials": "no"}, "must be True or False"),
        ({"allow_origins": [ORIGIN], "max_age": "ten"}, r"cors\['max_age'\] must be whole"),
        ({"allow_origin_regex": "https://(a"}, r"cors\['allow_origin_regex'\] 'https://\(a'"),
        ({"allow_origin_regex": 5}, "allow_origin_regex'] must be a string"),
    ],
)
def test_bad_cors_options_are_refused_naming_the_fix(cors: Any, message: str) -> None:
    # a ValueError naming the option at build time, never a crash at the first request
    with pytest.raises(ValueError, match=message):
        resilient(Starlette(), cors=cors, environ={})


async def _burst(client: httpx.AsyncClient, path: str, count: int) -> list[httpx.Response]:
    responses: list[httpx.Response] = []

    async def one() -> None:
        responses.append(await client.get(path, headers={"origin": ORIGIN}))

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one)
    return responses
