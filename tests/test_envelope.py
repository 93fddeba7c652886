from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

from asgi_resilience import (
    EnvelopeMiddleware,
    RequestContext,
    RequestIdMiddleware,
    add_envelope_meta,
    skip_envelope,
)
from asgi_resilience.context import CONTEXT_KEY
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send
from tests.asgi import Response, call, client_for, http_scope

pytestmark = pytest.mark.anyio

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
JSON = (b"content-type", b"application/json")
PATHSEND: dict[str, Any] = {"http.response.pathsend": {}}


def raw_app(
    body: Sequence[bytes] = (b'{"id":1}',),
    *,
    status: int = 200,
    headers: Sequence[tuple[bytes, bytes]] = (JSON,),
    content_length: bool = True,
    before_start: Callable[[], None] | None = None,
) -> ASGIApp:
    """An app answering ``body`` in as many body messages as it has items."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if before_start is not None:
            before_start()
        start_headers = list(headers)
        if content_length:
            start_headers.append((b"content-length", str(len(b"".join(body))).encode()))
        await send({"type": "http.response.start", "status": status, "headers": start_headers})
        for index, chunk in enumerate(body):
            more_body = index < len(body) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more_body})

    return app


async def call_receive() -> Message:
    return {"type": "http.disconnect"}


def assert_envelope(response: Response, data: Any) -> dict[str, Any]:
    """The response is a success envelope around ``data``; returns the parsed document."""
    document: dict[str, Any] = response.json()
    assert list(document) == ["success", "data", "meta"]
    assert document["success"] is True
    assert document["data"] == data
    assert TIMESTAMP.fullmatch(document["meta"]["timestamp"])
    return document


def content_length(response: Response) -> int | None:
    values = response.header_list("content-length")
    assert len(values) <= 1
    return int(values[0]) if values else None


async def compare_with_bare(app: ASGIApp, scope: Scope | None = None, **options: Any) -> None:
    """The enveloped app sends exactly what the bare app sends."""
    bare = await call(app, scope if scope is not None else http_scope())
    wrapped = await call(
        EnvelopeMiddleware(app, **options), scope if scope is not None else http_scope()
    )
    assert wrapped.messages == bare.messages


# --- wrapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "data"),
    [
        (b'{"id":1,"name":"caf\xc3\xa9"}', {"id": 1, "name": "café"}),
        (b"[1, 2, 3]", [1, 2, 3]),
        (b'"text"', "text"),
        (b"0", 0),
    ],
)
async def test_json_body_is_wrapped_with_fixed_content_length(body: bytes, data: Any) -> None:
    response = await call(EnvelopeMiddleware(raw_app([body])))

    assert response.status == 200
    document = assert_envelope(response, data)
    assert document["meta"]["request_id"] is None  # no RequestIdMiddleware
    assert content_length(response) == len(response.body)


async def test_content_type_with_parameters_and_case_is_wrapped() -> None:
    app = raw_app(headers=[(b"Content-Type", b"Application/JSON; charset=utf-8")])

    response = await call(EnvelopeMiddleware(app))

    assert_envelope(response, {"id": 1})
    assert content_length(response) == len(response.body)


async def test_meta_request_id_matches_header_and_timestamp_is_utc_now() -> None:
    app = RequestIdMiddleware(EnvelopeMiddleware(raw_app()))
    before = datetime.now(timezone.utc)

    response = await call(app)

    document = assert_envelope(response, {"id": 1})
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert document["meta"]["request_id"] == request_id
    timestamp = document["meta"]["timestamp"]
    assert timestamp.endswith("Z")
    parsed = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= parsed <= datetime.now(timezone.utc)


async def test_incoming_request_id_lands_in_meta() -> None:
    app = RequestIdMiddleware(EnvelopeMiddleware(raw_app()))
    scope = http_scope(headers=[(b"x-request-id", b"abc-123")])

    response = await call(app, scope)

    assert response.headers["x-request-id"] == "abc-123"
    assert assert_envelope(response, {"id": 1})["meta"]["request_id"] == "abc-123"


async def test_custom_content_types_are_wrapped_and_others_not() -> None:
    vendor = raw_app(headers=[(b"content-type", b"application/vnd.api+json")])
    middleware = EnvelopeMiddleware(vendor, content_types=["application/vnd.api+json"])

    assert_envelope(await call(middleware), {"id": 1})
    await compare_with_bare(raw_app(), content_types=["application/vnd.api+json"])


async def test_empty_json_body_with_content_length_zero_gives_null_data() -> None:
    response = await call(EnvelopeMiddleware(raw_app([b""])))

    assert_envelope(response, None)
    assert content_length(response) == len(response.body)


# --- streaming -------------------------------------------------------------------------------


async def test_streamed_json_is_wrapped_chunk_by_chunk_without_buffering() -> None:
    chunks = [b'[{"n":1},', b'{"n":2},', b'{"n":3}]']
    downstream: list[Message] = []
    delivered_before_next: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [JSON]})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            delivered_before_next.append(len(downstream))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def send(message: Message) -> None:
        downstream.append(message)

    middleware = EnvelopeMiddleware(app)
    await middleware(http_scope(), call_receive, send)

    # Each chunk was handed on before the application produced the next one.
    assert delivered_before_next == [2, 3, 4]
    bodies = [m for m in downstream if m["type"] == "http.response.body"]
    assert len(bodies) == 4
    for chunk, message in zip(chunks, bodies, strict=False):
        assert message["more_body"] is True
        assert message["body"].endswith(chunk)
    assert bodies[0]["body"].startswith(b'{"success":true,"data":')
    assert bodies[-1]["more_body"] is False
    response = Response(downstream)
    assert content_length(response) is None
    assert_envelope(response, [{"n": 1}, {"n": 2}, {"n": 3}])


async def test_streamed_json_with_content_length_keeps_it_exact() -> None:
    response = await call(EnvelopeMiddleware(raw_app([b'{"a":', b"[1,2]", b"}"])))

    assert_envelope(response, {"a": [1, 2]})
    assert content_length(response) == len(response.body)
    assert [m["more_body"] for m in response.body_messages] == [True, True, False]


@pytest.mark.parametrize("body", [[b""], [b"", b""], [b"", b"", b""]], ids=["one", "two", "three"])
async def test_empty_streamed_body_gives_null_data(body: list[bytes]) -> None:
    response = await call(EnvelopeMiddleware(raw_app(body, content_length=False)))

    assert_envelope(response, None)
    assert content_length(response) is None


async def test_meta_added_while_streaming_lands_in_suffix() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [JSON]})
        await send({"type": "http.response.body", "body": b"[1", "more_body": True})
        add_envelope_meta(next_cursor="abc")
        await send({"type": "http.response.body", "body": b"]", "more_body": False})

    response = await call(EnvelopeMiddleware(app))

    assert assert_envelope(response, [1])["meta"]["next_cursor"] == "abc"


# --- untouched responses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "app",
    [
        raw_app([b"<p>hi</p>"], headers=[(b"content-type", b"text/html; charset=utf-8")]),
        raw_app([b""], status=204),
        raw_app([b""], status=204, headers=[JSON]),
        raw_app([b"{}"], status=304, headers=[JSON]),
        raw_app([b"data: 1\n\n", b""], headers=[(b"content-type", b"text/event-stream")]),
        raw_app([b'{"detail":"Not Found"}'], status=404),
        raw_app([b'{"detail":"x"}'], status=422),
        raw_app([b'{"detail":"boom"}'], status=500),
        raw_app([b'{"detail":"down"}'], status=503),
        raw_app([b'{"moved":true}'], status=301),
        raw_app([b'{"id":1}'], headers=[]),
        raw_app([b'{"id":1}'], headers=[(b"content-type", b"application/jsonp")]),
    ],
    ids=[
        "html",
        "204",
        "204-json",
        "304",
        "event-stream",
        "404",
        "422",
        "500",
        "503",
        "301",
        "no-content-type",
        "other-json-like-type",
    ],
)
async def test_response_is_untouched(app: ASGIApp) -> None:
    await compare_with_bare(app)


@pytest.mark.parametrize("path", ["/items", "/sync"])
async def test_head_gets_the_headers_get_gets_and_no_body(path: str) -> None:
    app = starlette_app()
    async with client_for(app) as client:
        got = await client.get(path, headers={"X-Request-ID": "same-id"})
        head = await client.head(path, headers={"X-Request-ID": "same-id"})
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) == len(got.content)  # RFC 9110 section 9.3.2
    assert head.headers == got.headers


async def test_head_of_a_streamed_or_unwrapped_response_is_untouched() -> None:
    head = http_scope(method="HEAD")
    await compare_with_bare(raw_app([b""], content_length=False), head)
    await compare_with_bare(raw_app([b""], status=404), head)
    await compare_with_bare(raw_app([b""], headers=[(b"content-type", b"text/html")]), head)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-encoding", b"gzip"), JSON],
        [JSON, (b"content-encoding", b"gzip")],
    ],
    ids=["encoding-first", "encoding-last"],
)
async def test_content_encoded_response_is_untouched(headers: list[tuple[bytes, bytes]]) -> None:
    body = gzip.compress(b'{"id":1}')
    await compare_with_bare(raw_app([body], headers=headers))


async def test_gzip_middleware_output_is_untouched() -> None:
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"items": list(range(200))})

    app = Starlette(routes=[Route("/", endpoint)], middleware=[Middleware(GZipMiddleware)])

    response = await call(
        EnvelopeMiddleware(app), http_scope(headers=[(b"accept-encoding", b"gzip")])
    )

    assert response.headers["content-encoding"] == "gzip"
    assert content_length(response) == len(response.body)
    assert json.loads(gzip.decompress(response.body)) == {"items": list(range(200))}


@pytest.mark.parametrize("path", ["/docs", "/docs/", "/docs/x", "/docs/x/y"])
async def test_excluded_paths_are_untouched(path: str) -> None:
    await compare_with_bare(raw_app(), http_scope(path), exclude_paths=("/docs",))


@pytest.mark.parametrize("path", ["/docsx", "/doc", "/", "/api/docs"])
async def test_paths_beside_an_excluded_one_are_wrapped(path: str) -> None:
    middleware = EnvelopeMiddleware(raw_app(), exclude_paths=("/docs",))

    assert_envelope(await call(middleware, http_scope(path)), {"id": 1})


async def test_excluded_path_with_trailing_slash_covers_the_path() -> None:
    middleware = EnvelopeMiddleware(raw_app(), exclude_paths=("/docs/",))

    assert (await call(middleware, http_scope("/docs"))).body == b'{"id":1}'
    assert (await call(middleware, http_scope("/docs/a"))).body == b'{"id":1}'
    assert_envelope(await call(middleware, http_scope("/docsx")), {"id": 1})


async def test_skip_envelope_leaves_the_response_untouched() -> None:
    await compare_with_bare(raw_app(before_start=skip_envelope))


async def test_skip_envelope_applies_to_its_own_request_only() -> None:
    skipping = EnvelopeMiddleware(raw_app(before_start=skip_envelope))
    plain = EnvelopeMiddleware(raw_app())

    assert (await call(skipping)).body == b'{"id":1}'
    assert_envelope(await call(plain), {"id": 1})


@pytest.mark.parametrize("value", [b"abc", b"", b"1.5", b"12, 12"])
async def test_non_integer_content_length_is_untouched(value: bytes) -> None:
    app = raw_app(headers=[JSON, (b"content-length", value)], content_length=False)

    await compare_with_bare(app)


# --- meta from handlers ----------------------------------------------------------------------


async def paginated(request: Request) -> JSONResponse:
    add_envelope_meta(page=2, total=10)
    add_envelope_meta(request_id="forged", timestamp="yesterday", total=11)
    return JSONResponse([{"id": 1}])


def paginated_sync(request: Request) -> JSONResponse:
    add_envelope_meta(page=3)
    return JSONResponse([{"id": 2}])


def starlette_app() -> Starlette:
    return Starlette(
        routes=[Route("/items", paginated), Route("/sync", paginated_sync)],
        middleware=[Middleware(RequestIdMiddleware), Middleware(EnvelopeMiddleware)],
    )


async def get(app: ASGIApp, path: str, **kwargs: Any) -> httpx.Response:
    async with client_for(app) as client:
        return await client.get(path, **kwargs)


async def test_add_envelope_meta_adds_fields_but_cannot_override_own_meta() -> None:
    response = await get(starlette_app(), "/items")

    document = response.json()
    assert document["data"] == [{"id": 1}]
    meta = document["meta"]
    assert meta["page"] == 2
    assert meta["total"] == 11
    assert meta["request_id"] == response.headers["x-request-id"]
    assert TIMESTAMP.fullmatch(meta["timestamp"])
    assert list(meta) == ["request_id", "timestamp", "page", "total"]
    assert int(response.headers["content-length"]) == len(response.content)


async def test_add_envelope_meta_works_from_a_sync_endpoint() -> None:
    response = await get(starlette_app(), "/sync")

    assert response.json()["data"] == [{"id": 2}]
    assert response.json()["meta"]["page"] == 3
    assert int(response.headers["content-length"]) == len(response.content)


async def test_meta_does_not_leak_between_requests() -> None:
    app = starlette_app()

    await get(app, "/items")
    response = await get(app, "/sync")

    assert set(response.json()["meta"]) == {"request_id", "timestamp", "page"}


async def test_helpers_outside_a_request_do_nothing() -> None:
    assert RequestContext.current() is None
    add_envelope_meta(page=99)
    skip_envelope()
    assert RequestContext.current() is None

    response = await call(EnvelopeMiddleware(raw_app()))

    document = assert_envelope(response, {"id": 1})
    assert set(document["meta"]) == {"request_id", "timestamp"}


def test_helpers_outside_a_request_do_nothing_in_sync_code() -> None:
    add_envelope_meta(page=1)
    skip_envelope()
    assert RequestContext.current() is None


# --- pathsend --------------------------------------------------------------------------------


async def test_pathsend_json_file_is_enveloped(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(b'{"file": true}')
    scope = http_scope(extensions=PATHSEND)

    response = await call(EnvelopeMiddleware(FileResponse(path)), scope)

    assert all(m["type"] != "http.response.pathsend" for m in response.messages)
    assert_envelope(response, {"file": True})
    assert content_length(response) == len(response.body)
    assert response.body_messages[-1].get("more_body", False) is False


async def test_pathsend_large_json_file_is_enveloped(tmp_path: Path) -> None:
    data = [{"n": n, "pad": "x" * 50} for n in range(3000)]  # several read chunks
    path = tmp_path / "big.json"
    path.write_text(json.dumps(data))

    response = await call(EnvelopeMiddleware(FileResponse(path)), http_scope(extensions=PATHSEND))

    assert len(response.body_messages) > 2
    assert_envelope(response, data)
    assert content_length(response) == len(response.body)


async def test_pathsend_empty_json_file_gives_null_data(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_bytes(b"")

    response = await call(EnvelopeMiddleware(FileResponse(path)), http_scope(extensions=PATHSEND))

    assert_envelope(response, None)
    assert content_length(response) == len(response.body)


async def test_pathsend_non_json_file_passes_through(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_bytes(b"<p>hi</p>")
    response = await call(EnvelopeMiddleware(FileResponse(path)), http_scope(extensions=PATHSEND))

    assert [m["type"] for m in response.messages] == [
        "http.response.start",
        "http.response.pathsend",
    ]
    assert response.messages[1]["path"] == str(path)


# --- frameworks ------------------------------------------------------------------------------


async def test_starlette_app_json_wrapped_and_others_untouched() -> None:
    async def html(request: Request) -> StarletteResponse:
        return StarletteResponse("<p>hi</p>", media_type="text/html")

    app = Starlette(
        routes=[Route("/items", paginated), Route("/html", html)],
        middleware=[Middleware(EnvelopeMiddleware)],
    )

    wrapped = await get(app, "/items")
    page = await get(app, "/html")
    missing = await get(app, "/missing")

    assert wrapped.json()["success"] is True
    assert wrapped.json()["data"] == [{"id": 1}]
    assert page.text == "<p>hi</p>"
    assert int(page.headers["content-length"]) == len(b"<p>hi</p>")
    assert missing.status_code == 404
    assert missing.text == "Not Found"


async def test_fastapi_app_json_route_is_wrapped() -> None:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def read_item(item_id: int) -> dict[str, Any]:
        add_envelope_meta(version=1)
        return {"item_id": item_id, "tags": ["a"]}

    app.add_middleware(EnvelopeMiddleware, exclude_paths=("/docs", "/openapi.json"))
    app.add_middleware(RequestIdMiddleware)

    response = await get(app, "/items/7")
    invalid = await get(app, "/items/abc")
    schema = await get(app, "/openapi.json")

    assert response.status_code == 200
    document = response.json()
    assert document["success"] is True
    assert document["data"] == {"item_id": 7, "tags": ["a"]}
    assert document["meta"]["request_id"] == response.headers["x-request-id"]
    assert document["meta"]["version"] == 1
    assert int(response.headers["content-length"]) == len(response.content)
    assert invalid.status_code == 422
    assert "success" not in invalid.json()
    assert "openapi" in schema.json()


# --- other scopes and options ----------------------------------------------------------------


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan"])
async def test_other_scopes_pass_through(scope_type: str) -> None:
    seen: list[Scope] = []
    sent: list[Message] = []
    outgoing: Message = {"type": f"{scope_type}.whatever", "text": '{"a":1}'}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await send(outgoing)

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": scope_type, "path": "/ws", "headers": []}
    await EnvelopeMiddleware(app)(scope, call_receive, send)

    assert seen == [scope]
    assert seen[0] is scope
    assert CONTEXT_KEY not in scope
    assert sent == [outgoing]
    assert sent[0] is outgoing


@pytest.mark.parametrize("path", ["docs", "", "docs/"])
def test_exclude_path_without_leading_slash_is_rejected(path: str) -> None:
    with pytest.raises(ValueError, match="start with '/'"):
        EnvelopeMiddleware(raw_app(), exclude_paths=(path,))


def test_empty_content_types_are_rejected() -> None:
    with pytest.raises(ValueError, match="content_types"):
        EnvelopeMiddleware(raw_app(), content_types=())


async def test_205_reset_content_is_never_given_a_body() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 205, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    response = await call(EnvelopeMiddleware(app))
    assert response.status == 205
    assert response.body == b""


def test_content_types_given_as_a_string_are_refused() -> None:
    with pytest.raises(ValueError, match="must be a list"):
        EnvelopeMiddleware(raw_app(), content_types="application/json")


async def test_a_fastapi_apps_openapi_document_and_docs_are_never_enveloped() -> None:
    from fastapi import FastAPI

    from asgi_resilience import resilient
    from tests.asgi import client_for

    api = FastAPI(openapi_url="/api/openapi.json")

    @api.get("/items")
    async def items() -> list[int]:
        return [1, 2]

    async with client_for(resilient(api, envelope=True, environ={})) as client:
        document = (await client.get("/api/openapi.json")).json()
        docs = await client.get("/docs")
        enveloped = (await client.get("/items")).json()
    assert document["openapi"].startswith("3.") and "/items" in document["paths"]
    assert docs.status_code == 200 and "/api/openapi.json" in docs.text
    assert enveloped["success"] is True and enveloped["data"] == [1, 2]
