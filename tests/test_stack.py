from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from asgi_resilience import (
    BuiltinEndpoints,
    LifespanMiddleware,
    MetricsMiddleware,
    NotFound,
    ResilientApp,
    TracingMiddleware,
    get_request_id,
    resilient,
)
from asgi_resilience.access_log import AccessLogMiddleware
from asgi_resilience.envelope import EnvelopeMiddleware
from asgi_resilience.errors import ErrorMiddleware
from asgi_resilience.request_id import RequestIdMiddleware
from asgi_resilience.types import ASGIApp, Receive, Scope, Send
from tests.asgi import call, client_for, http_scope, layers

pytestmark = pytest.mark.anyio


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw ASGI callable: /ok answers JSON, /fail raises deep inside."""
    if scope["path"] == "/fail":
        raise RuntimeError("db password is hunter2")
    if scope["path"] == "/missing":
        raise NotFound("no such thing")
    headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def starlette_app() -> Starlette:
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"id": request.path_params["item_id"], "rid": get_request_id()})

    async def fail(request: Request) -> JSONResponse:
        raise RuntimeError("db password is hunter2")

    return Starlette(
        routes=[Route("/items/{item_id:int}", item), Route("/fail", fail, methods=["GET"])]
    )


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        if item_id == 404:
            raise HTTPException(status_code=404, detail="Item not found")
        return {"id": item_id}

    @app.get("/fail")
    async def fail() -> dict[str, str]:
        raise RuntimeError("db password is hunter2")

    return app


@pytest.mark.parametrize("make_app", [starlette_app, fastapi_app], ids=["starlette", "fastapi"])
async def test_frameworks_errors_carry_the_request_id_everywhere(
    make_app: type[Starlette], caplog: pytest.LogCaptureFixture
) -> None:
    app = resilient(make_app(), debug=False)
    async with client_for(app) as client:
        responses = {
            "ok": await client.get("/items/1"),
            "500": await client.get("/fail", headers={"X-Request-ID": "trace-me-500"}),
            "404": await client.get("/nowhere"),
            "405": await client.post("/fail"),
            "422": await client.get("/items/abc"),
        }
    assert responses["ok"].status_code == 200
    for name, response in responses.items():
        request_id = response.headers["x-request-id"]
        assert request_id, name
        if name != "ok":
            assert response.headers["content-type"] == "application/problem+json", name
            body = response.json()
            assert body["request_id"] == request_id, name
            assert body["status"] == response.status_code, name
    assert responses["500"].headers["x-request-id"] == "trace-me-500"
    assert responses["500"].status_code == 500
    assert "hunter2" not in responses["500"].text
    assert "Traceback" not in responses["500"].text
    assert responses["405"].status_code == 405
    assert "GET" in responses["405"].headers["allow"]
    assert responses["404"].status_code == 404
    assert responses["422"].status_code in (404, 422)  # Starlette's int converter: no match
    errors_logged = [r for r in caplog.records if r.name == "asgi_resilience.errors"]
    assert len(errors_logged) == 1
    assert errors_logged[0].exc_info is not None
    assert getattr(errors_logged[0], "request_id", None) == "trace-me-500"


async def test_fastapi_validation_and_http_exception_shapes() -> None:
    async with client_for(resilient(fastapi_app())) as client:
        invalid = await client.get("/items/abc")
        missing = await client.get("/items/404")
    assert invalid.status_code == 422
    assert invalid.json()["errors"][0]["loc"] == ["path", "item_id"]
    assert missing.status_code == 404
    assert missing.json()["detail"] == "Item not found"


async def test_raw_asgi_app_through_the_whole_stack(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "asgi_resilience.access")
    app = resilient(raw_app, envelope=True)
    ok = await call(app, http_scope("/ok"))
    failed = await call(app, http_scope("/fail"))
    missing = await call(app, http_scope("/missing"))
    assert ok.json()["data"] == {"ok": True}
    assert ok.json()["meta"]["request_id"] == ok.headers["x-request-id"]
    assert int(ok.headers["content-length"]) == len(ok.body)
    for response, status in ((failed, 500), (missing, 404)):
        body = response.json()
        assert response.status == status
        assert body["success"] is False
        assert body["error"]["status"] == status
        assert body["meta"]["request_id"] == response.headers["x-request-id"]
    assert missing.json()["error"]["message"] == "no such thing"
    access = [r for r in caplog.records if r.name == "asgi_resilience.access"]
    assert [r.status for r in access] == [200, 500, 404]  # type: ignore[attr-defined]
    assert [getattr(r, "error", None) for r in access] == [None, "RuntimeError", "NotFound"]


async def test_stack_order_and_switches() -> None:
    app = resilient(raw_app, envelope=True)
    assert isinstance(app, ResilientApp) and app.app is raw_app
    kinds = [type(layer) for layer in layers(app.stack)]
    assert kinds == [
        LifespanMiddleware,
        RequestIdMiddleware,
        TracingMiddleware,
        MetricsMiddleware,
        AccessLogMiddleware,
        ErrorMiddleware,
        BuiltinEndpoints,
        EnvelopeMiddleware,
        type(raw_app),  # the app itself, and nothing after it
    ]
    bare = resilient(
        raw_app,
        request_ids=False,
        access_log=False,
        errors=False,
        health_path=None,
        metrics=False,
        metrics_path=None,
        tracing=False,
    )
    assert isinstance(bare.stack, LifespanMiddleware) and bare.stack.app is raw_app
    assert bare.health is None
    with pytest.raises(ValueError, match="already wrapped"):
        resilient(app)


async def test_exception_mid_stream_reaches_the_server_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"part": 1'
            raise RuntimeError("broken stream")

        return StreamingResponse(chunks(), media_type="application/json")

    app = resilient(Starlette(routes=[Route("/stream", stream)]), envelope=True)
    messages: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        messages.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    with pytest.raises(RuntimeError, match="broken stream"):
        await app(http_scope("/stream"), receive, send)  # type: ignore[arg-type]
    assert [m["type"] for m in messages].count("http.response.start") == 1
    assert messages[0]["status"] == 200
    assert b'"part": 1' in b"".join(m.get("body", b"") for m in messages)  # type: ignore[misc]
    assert not any(m.get("more_body") is False for m in messages[1:])
    logged = [r for r in caplog.records if r.exc_info and r.name.startswith("asgi_resilience")]
    assert len(logged) == 1


def test_websockets_and_lifespan_pass_through_the_stack() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, str]]:
        events.append("startup")
        yield {"greeting": "hello"}
        events.append("shutdown")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(f"{websocket.state.greeting} {text}")
        await websocket.close()

    async def state(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{request.state.greeting} {request.state.request_id}")

    inner = Starlette(
        routes=[WebSocketRoute("/ws", echo), Route("/state", state)], lifespan=lifespan
    )
    with TestClient(resilient(inner)) as client:
        assert events == ["startup"]
        with client.websocket_connect("/ws") as websocket:
            websocket.send_text("world")
            assert websocket.receive_text() == "hello world"
        response = client.get("/state", headers={"X-Request-ID": "abc"})
        assert response.text == "hello abc"
    assert events == ["startup", "shutdown"]


async def test_error_body_in_debug_mode_shows_the_exception() -> None:
    async with client_for(resilient(starlette_app(), debug=True)) as client:
        response = await client.get("/fail")
    body = response.json()
    assert response.status_code == 500
    assert body["exception"]["message"] == "db password is hunter2"
    assert "RuntimeError" in body["exception"]["type"]
    assert any("Traceback" in line for line in body["exception"]["traceback"])


async def test_debug_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "development")
    async with client_for(resilient(starlette_app())) as client:
        response = await client.get("/fail")
    assert "hunter2" in json.dumps(response.json())


async def test_debug_default_comes_from_the_environ_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``environ={}`` ignores the process environment, APP_ENV included."""
    monkeypatch.setenv("APP_ENV", "development")
    async with client_for(resilient(starlette_app(), environ={})) as client:
        hidden = (await client.get("/fail")).json()
    monkeypatch.delenv("APP_ENV")
    given = resilient(starlette_app(), environ={"ENVIRONMENT": "local"})
    async with client_for(given) as client:
        shown = (await client.get("/fail")).json()
    assert "hunter2" not in json.dumps(hidden) and "exception" not in hidden
    assert shown["exception"]["message"] == "db password is hunter2"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the Redis client is asyncio-only
async def test_one_lifespan_can_serve_two_stacks() -> None:
    """An app factory called twice with a module-level Lifespan must not fail to register."""
    from prometheus_client import CollectorRegistry

    from asgi_resilience import Lifespan

    lifespan = Lifespan()
    options: dict[str, object] = {
        "lifespan": lifespan,
        "rate_limit": "5/second",
        "rate_limit_backend": "redis://127.0.0.1:6379/0",
        "environ": {},
    }
    first = resilient(raw_app, registry=CollectorRegistry(), **options)  # type: ignore[arg-type]
    second = resilient(raw_app, registry=CollectorRegistry(), **options)  # type: ignore[arg-type]
    assert first.lifespan is second.lifespan is lifespan
    assert lifespan.resource_names == ["rate-limit-backend", "rate-limit-backend-2"]
    assert list(lifespan.checks) == ["rate-limit-backend", "rate-limit-backend-2"]
    for stack in (first, second):
        backend = stack.stack
        while not hasattr(backend, "backend"):
            backend = backend.app  # type: ignore[attr-defined]
        await backend.backend.aclose()


@pytest.mark.parametrize("make_app", [starlette_app, fastapi_app], ids=["starlette", "fastapi"])
async def test_rate_limit_and_request_id_headers_on_errors_rendered_outside(
    make_app: type[Starlette],
) -> None:
    # The 500 for a raised exception and the rewritten 404 are sent by ErrorMiddleware, outside
    # the rate limiter: its headers still reach the client, once, with the request id.
    app = resilient(make_app(), rate_limit="100/minute", registry=CollectorRegistry())
    async with client_for(app) as client:
        responses = [await client.get("/fail"), await client.get("/nowhere")]
    assert [r.status_code for r in responses] == [500, 404]
    for remaining, response in zip((99, 98), responses, strict=True):
        reset = 100 - remaining  # GCRA: 0.6 s of budget per request used, rounded up
        assert response.headers.get_list("ratelimit") == [f'"100-per-60s";r={remaining};t={reset}']
        assert response.headers["x-ratelimit-remaining"] == str(remaining)
        assert len(response.headers.get_list("x-request-id")) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"envelope": "yes"}, "envelope must be True or False, got 'yes'"),
        ({"metrics": 1}, "metrics must be True or False"),
        ({"rate_limit_routes": {"/search": "2/second"}}, "rate_limit_routes does nothing"),
        ({"rate_limit_strategy": "fixed-window"}, "rate_limit_strategy does nothing"),
        ({"rate_limit_key": "header:X-API-Key"}, "rate_limit_key does nothing"),
    ],
)
def test_options_that_cannot_work_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resilient(starlette_app(), environ={}, **options)  # type: ignore[arg-type]


def test_rate_limit_options_from_the_environment_need_a_rate_limit_too() -> None:
    environ = {"ASGI_RESILIENCE_RATE_LIMIT_KEY": "header:X-API-Key"}
    with pytest.raises(ValueError, match="rate_limit_key does nothing without rate_limit"):
        resilient(starlette_app(), environ=environ)
    # the defaults said out loud are harmless, and with a limit they all apply
    resilient(starlette_app(), environ={}, rate_limit_strategy="gcra")
    resilient(starlette_app(), environ={**environ, "ASGI_RESILIENCE_RATE_LIMIT": "5/second"})


def test_something_that_is_not_an_app_is_refused() -> None:
    with pytest.raises(ValueError, match=r"app must be an ASGI application .* got None"):
        resilient(None)  # type: ignore[arg-type]


async def test_environ_decides_multiprocess_metrics_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # an empty one: no worker files

    async def scrape(app: ASGIApp) -> str:
        await call(app, http_scope("/things"))
        return (await call(app, http_scope("/metrics"))).body.decode()

    ignoring = resilient(raw_app, environ={}, registry=CollectorRegistry())
    assert "prometheus-multiprocess" not in ignoring.lifespan.resource_names
    assert 'http_server_request_duration_seconds_count{method="GET"' in await scrape(ignoring)

    import os

    reading = resilient(raw_app, environ=dict(os.environ), registry=CollectorRegistry())
    assert "prometheus-multiprocess" in reading.lifespan.resource_names
    # Aggregated from the directory's worker files (none), not from this process's registry.
    assert "http_server_request_duration_seconds_count{" not in await scrape(reading)
