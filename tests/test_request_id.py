from __future__ import annotations

import logging
import re

import anyio
import anyio.lowlevel
import httpx
import pytest
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from asgi_resilience import (
    RequestIdLogFilter,
    RequestIdMiddleware,
    generate_request_id,
    get_request_id,
)
from asgi_resilience.types import Receive, Scope, Send
from tests.asgi import call, client_for, http_scope

pytestmark = pytest.mark.anyio

HEX_ID = re.compile(r"[0-9a-f]{32}")


async def echo_id(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the id as the application sees it: context variable and scope state."""
    body = f"{get_request_id()}|{scope['state']['request_id']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def id_header(value: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"x-request-id", value)]


@pytest.mark.parametrize(
    "incoming",
    [
        "0f2c4b6e8a1d3f5b7c9e1a2b3c4d5e6f",  # nginx $request_id
        "123e4567-e89b-12d3-a456-426614174000",  # UUID with dashes
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",  # ULID
        "!~",
        "a" * 128,
    ],
)
async def test_valid_incoming_id_is_kept_everywhere(incoming: str) -> None:
    response = await call(
        RequestIdMiddleware(echo_id), http_scope(headers=id_header(incoming.encode()))
    )
    assert response.headers["x-request-id"] == incoming
    assert response.body.decode() == f"{incoming}|{incoming}"


async def test_missing_id_is_generated_as_32_hex() -> None:
    response = await call(RequestIdMiddleware(echo_id))
    request_id = response.headers["x-request-id"]
    assert HEX_ID.fullmatch(request_id)
    assert response.body.decode() == f"{request_id}|{request_id}"


def test_generate_request_id_is_random_hex() -> None:
    ids = {generate_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(HEX_ID.fullmatch(i) for i in ids)


@pytest.mark.parametrize(
    "bad",
    [
        b"abc\r\nSet-Cookie: x=1",
        b"abc\nx",
        b"abc\x00def",
        "caf\u00e9".encode(),
        b"\xff\xfe",
        b"",
        b"has space",
        b"a" * 129,
        b"x" * 10_000,
    ],
)
async def test_invalid_incoming_id_is_replaced_and_logged_escaped(
    bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "asgi_resilience.request_id")
    response = await call(RequestIdMiddleware(echo_id), http_scope(headers=id_header(bad)))
    assert response.status == 200
    new_id = response.headers["x-request-id"]
    assert HEX_ID.fullmatch(new_id)
    assert response.body.decode() == f"{new_id}|{new_id}"
    [record] = [r for r in caplog.records if r.name == "asgi_resilience.request_id"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "\r" not in message and "\n" not in message and "\x00" not in message
    assert message.isascii()
    assert len(message) < 300  # a 10 kB value is cut, not copied into the log
    assert f"({len(bad)} bytes)" in message
    assert getattr(record, "request_id", None) == new_id


async def test_reject_mode_answers_400_problem_with_fresh_id() -> None:
    app = RequestIdMiddleware(echo_id, on_invalid="reject")
    response = await call(app, http_scope(headers=id_header(b"bad\x00id")))
    assert response.status == 400
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 400
    assert body["request_id"] == response.headers["x-request-id"]
    assert HEX_ID.fullmatch(body["request_id"])
    assert "x-request-id" in body["detail"].lower()
    assert int(response.headers["content-length"]) == len(response.body)


async def test_reject_mode_lets_valid_and_missing_ids_through() -> None:
    app = RequestIdMiddleware(echo_id, on_invalid="reject")
    assert (await call(app, http_scope(headers=id_header(b"good-id")))).status == 200
    assert (await call(app)).status == 200


async def test_untrusted_incoming_id_is_ignored_without_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = RequestIdMiddleware(echo_id, trust_incoming=False, on_invalid="reject")
    response = await call(app, http_scope(headers=id_header(b"client-chosen\x00")))
    assert response.status == 200
    assert response.headers["x-request-id"] != "client-chosen"
    assert HEX_ID.fullmatch(response.headers["x-request-id"])
    assert not [r for r in caplog.records if r.name == "asgi_resilience.request_id"]


async def test_custom_header_name_and_generator() -> None:
    app = RequestIdMiddleware(echo_id, header_name="X-Correlation-ID", generator=lambda: "fixed-1")
    response = await call(app)
    assert response.headers["x-correlation-id"] == "fixed-1"
    assert "x-request-id" not in response.headers
    kept = await call(app, http_scope(headers=[(b"x-correlation-id", b"from-proxy")]))
    assert kept.headers["x-correlation-id"] == "from-proxy"


def failing_generator() -> str:
    raise RuntimeError("generator broke")


@pytest.mark.parametrize("generator", [failing_generator, lambda: "bad id\n", lambda: ""])
async def test_misbehaving_generator_falls_back_to_default(
    generator: object, caplog: pytest.LogCaptureFixture
) -> None:
    app = RequestIdMiddleware(echo_id, generator=generator)  # type: ignore[arg-type]
    response = await call(app)
    assert response.status == 200
    assert HEX_ID.fullmatch(response.headers["x-request-id"])
    assert [r for r in caplog.records if r.levelno == logging.ERROR]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_invalid": "ignore"}, "on_invalid"),
        ({"header_name": "X Request"}, "header_name"),
        ({"header_name": "X-Requ\u00eat"}, "header_name"),
        ({"header_name": ""}, "header_name"),
    ],
)
def test_invalid_options_raise_value_error(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RequestIdMiddleware(echo_id, **options)  # type: ignore[arg-type]


async def test_response_header_set_by_the_app_is_replaced_not_duplicated() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"X-Request-ID", b"app-made"), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    response = await call(RequestIdMiddleware(app), http_scope(headers=id_header(b"abc")))
    assert response.header_list("x-request-id") == ["abc"]
    assert response.headers["content-type"] == "text/plain"


async def test_two_id_layers_answer_with_one_id_each_header() -> None:
    # A RequestIdMiddleware inside the app and another around it (resilient()): one id per
    # header name, the one the request was handled with; the app's own value still dropped.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"x-request-id", b"from-app"), (b"x-correlation-id", b"from-app")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": (get_request_id() or "").encode()})

    same = RequestIdMiddleware(RequestIdMiddleware(app))
    response = await call(same, http_scope())
    assert response.header_list("x-request-id") == [response.body.decode()]
    other = RequestIdMiddleware(RequestIdMiddleware(app, header_name="X-Correlation-ID"))
    response = await call(other, http_scope())
    assert response.header_list("x-request-id") == [response.body.decode()]
    assert response.header_list("x-correlation-id") == [response.body.decode()]


async def test_context_variable_is_reset_after_the_request() -> None:
    assert get_request_id() is None
    await call(RequestIdMiddleware(echo_id), http_scope(headers=id_header(b"abc")))
    assert get_request_id() is None


async def test_request_state_in_starlette() -> None:
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"state": request.state.request_id, "var": get_request_id()})

    app = RequestIdMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with client_for(app) as client:
        response = await client.get("/", headers={"X-Request-ID": "req-1"})
    assert response.json() == {"state": "req-1", "var": "req-1"}


async def test_sync_endpoint_in_threadpool_sees_the_id() -> None:
    def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(get_request_id()))

    app = RequestIdMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with client_for(app) as client:
        response = await client.get("/", headers={"X-Request-ID": "threaded"})
    assert response.text == "threaded"


async def test_200_concurrent_requests_each_see_only_their_own_id() -> None:
    async def endpoint(request: Request) -> PlainTextResponse:
        seen = [get_request_id()]
        for _ in range(3):
            await anyio.lowlevel.checkpoint()  # let the other requests interleave
            seen.append(get_request_id())
        return PlainTextResponse(",".join(str(s) for s in seen))

    app = RequestIdMiddleware(Starlette(routes=[Route("/", endpoint)]))
    results: dict[str, str] = {}

    async def one(client: httpx.AsyncClient, index: int) -> None:
        response = await client.get("/", headers={"X-Request-ID": f"req-{index}"})
        results[f"req-{index}"] = response.text

    async with client_for(app) as client:
        async with anyio.create_task_group() as group:
            for index in range(200):
                group.start_soon(one, client, index)
    assert len(results) == 200
    for request_id, text in results.items():
        assert text == ",".join([request_id] * 4)
    assert get_request_id() is None


async def test_websocket_and_lifespan_pass_through() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    middleware = RequestIdMiddleware(app)
    for scope_type in ("websocket", "lifespan"):
        scope: Scope = {"type": scope_type, "headers": [], "path": "/"}
        await middleware(scope, call_receive_never, call_send_never)
    assert [s["type"] for s in seen] == ["websocket", "lifespan"]
    assert all("state" not in s for s in seen)


async def call_receive_never() -> dict[str, object]:
    raise AssertionError("receive must not be called")


async def call_send_never(message: object) -> None:
    raise AssertionError("send must not be called")


class TestLogFilter:
    def make_record(self, **extra: object) -> logging.LogRecord:
        record = logging.makeLogRecord({"name": "app", "msg": "hello", **extra})
        assert RequestIdLogFilter().filter(record)
        return record

    def test_outside_a_request_uses_the_default(self) -> None:
        record = self.make_record()
        assert record.__dict__["request_id"] == "-"
        assert not hasattr(record, "trace_id")
        other = logging.makeLogRecord({"msg": "x"})
        RequestIdLogFilter(default="none").filter(other)
        assert other.__dict__["request_id"] == "none"

    def test_extra_request_id_wins(self) -> None:
        assert self.make_record(request_id="given").__dict__["request_id"] == "given"

    def test_name_filtering_still_applies(self) -> None:
        record = logging.makeLogRecord({"name": "other", "msg": "x"})
        assert not RequestIdLogFilter("app").filter(record)

    def test_active_span_adds_trace_and_span_ids(self) -> None:
        span_context = trace.SpanContext(
            trace_id=0x0AF7651916CD43DD8448EB211C80319C,
            span_id=0x00F067AA0BA902B7,
            is_remote=False,
            trace_flags=trace.TraceFlags(1),
        )
        with trace.use_span(trace.NonRecordingSpan(span_context)):
            record = self.make_record()
        assert record.__dict__["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
        assert record.__dict__["span_id"] == "00f067aa0ba902b7"

    async def test_records_logged_inside_a_request_carry_its_id(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        app_logger = logging.getLogger("tests.app")

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            app_logger.warning("inside")
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        caplog.handler.addFilter(RequestIdLogFilter())
        try:
            await call(RequestIdMiddleware(app), http_scope(headers=id_header(b"log-me")))
        finally:
            caplog.handler.removeFilter(caplog.handler.filters[-1])
        [record] = [r for r in caplog.records if r.name == "tests.app"]
        assert record.__dict__["request_id"] == "log-me"
