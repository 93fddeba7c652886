from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi import HTTPException as FastAPIHTTPException
from fastapi.exceptions import RequestValidationError
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from asgi_resilience import (
    AccessLogMiddleware,
    AppError,
    BadRequest,
    CircuitOpenError,
    Conflict,
    ErrorMiddleware,
    Forbidden,
    NotFound,
    RequestContext,
    RequestIdMiddleware,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnprocessableEntity,
    render_error,
)
from asgi_resilience.context import CONTEXT_KEY
from asgi_resilience.errors import default_debug
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send
from tests.asgi import Response, call, client_for, http_scope

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SECRET = "db password is hunter2"
PLAIN = [(b"content-type", b"text/plain")]


# --- small applications and helpers -------------------------------------------------------------


def raising(exc: Exception) -> ASGIApp:
    """A raw ASGI app that raises ``exc`` before sending anything."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


def returning(status: int, *chunks: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> ASGIApp:
    """A raw ASGI app answering ``status`` with ``headers`` and the body in ``chunks``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        parts = chunks or (b"",)
        for index, chunk in enumerate(parts):
            more_body = index < len(parts) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more_body})

    return app


def content_type(value: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", value)]


class Server:
    """The server's side of one request: every message the application sent, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    async def receive(self) -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    @property
    def response(self) -> Response:
        return Response(self.messages)


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "asgi_resilience.errors"]


def assert_problem(response: Response, status: int) -> dict[str, Any]:
    """The response is a well-formed problem with ``status``; returns its members."""
    assert response.status == status
    assert response.header_list("content-type") == [PROBLEM]
    assert int(response.headers["content-length"]) == len(response.body)
    problem: dict[str, Any] = response.json()
    assert problem["type"] == "about:blank"
    assert problem["status"] == status
    return problem


# --- production and debug ---------------------------------------------------------------------


async def test_unhandled_exception_in_production_reveals_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exc = RuntimeError(SECRET)
    response = await call(ErrorMiddleware(raising(exc), debug=False), http_scope("/orders"))

    problem = assert_problem(response, 500)
    assert problem["title"] == "Internal Server Error"
    assert problem["code"] == "internal_server_error"
    assert "detail" not in problem
    assert "exception" not in problem
    for leak in (b"hunter2", b"Traceback", b"RuntimeError"):
        assert leak not in response.body
        assert all(leak not in value for _, value in response.start["headers"])
    # Operators still get everything, once, in the log.
    [record] = error_records(caplog)
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[1] is exc


async def test_unhandled_exception_in_debug_shows_type_message_and_traceback() -> None:
    response = await call(ErrorMiddleware(raising(RuntimeError(SECRET)), debug=True))

    problem = assert_problem(response, 500)
    exception = problem["exception"]
    assert exception["type"] == "builtins.RuntimeError"
    assert exception["message"] == SECRET
    traceback = "".join(exception["traceback"])
    assert traceback.startswith("Traceback (most recent call last)")
    assert f"RuntimeError: {SECRET}" in traceback


@pytest.mark.parametrize(
    ("app_env", "environment", "expected"),
    [
        ("development", None, True),
        ("dev", None, True),
        ("local", None, True),
        (" Development ", None, True),
        (None, "dev", True),
        (None, "LOCAL", True),
        ("production", None, False),
        (None, "staging", False),
        ("production", "development", False),  # APP_ENV wins
        (None, None, False),
        ("", "", False),
    ],
)
def test_default_debug_reads_app_env_then_environment(
    monkeypatch: pytest.MonkeyPatch, app_env: str | None, environment: str | None, expected: bool
) -> None:
    for name, value in (("APP_ENV", app_env), ("ENVIRONMENT", environment)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert default_debug() is expected


@pytest.mark.parametrize(("app_env", "shown"), [("development", True), ("production", False)])
async def test_debug_none_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, app_env: str, shown: bool
) -> None:
    monkeypatch.delenv("ENVIRONMENT", raising=False)
    monkeypatch.setenv("APP_ENV", app_env)
    response = await call(ErrorMiddleware(raising(RuntimeError(SECRET))))
    assert (b"hunter2" in response.body) is shown


# --- the problem and envelope shapes ------------------------------------------------------------


async def test_problem_has_every_member_and_the_echoed_request_id() -> None:
    app = RequestIdMiddleware(ErrorMiddleware(raising(NotFound("No order 42"))))
    response = await call(app, http_scope("/orders/42"))

    problem = assert_problem(response, 404)
    request_id = response.headers["x-request-id"]
    assert problem == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "No order 42",
        "instance": "/orders/42",
        "code": "not_found",
        "request_id": request_id,
    }


async def test_problem_keeps_an_incoming_request_id() -> None:
    app = RequestIdMiddleware(ErrorMiddleware(raising(RuntimeError("boom"))))
    response = await call(app, http_scope(headers=[(b"x-request-id", b"abc-123")]))
    assert response.headers["x-request-id"] == "abc-123"
    assert assert_problem(response, 500)["request_id"] == "abc-123"


async def test_problem_request_id_is_null_without_request_id_middleware() -> None:
    response = await call(ErrorMiddleware(raising(NotFound())))
    assert assert_problem(response, 404)["request_id"] is None


async def test_problem_has_trace_id_only_inside_a_span() -> None:
    # The OpenTelemetry API alone is enough: a span context made by hand is valid.
    span_context = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    app = ErrorMiddleware(raising(Conflict()))
    with trace.use_span(NonRecordingSpan(span_context)):
        traced = await call(app)
    untraced = await call(app)

    assert assert_problem(traced, 409)["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "trace_id" not in assert_problem(untraced, 409)


async def test_envelope_error_shape() -> None:
    error = Conflict("Order already paid", extra={"order": 42})
    app = RequestIdMiddleware(ErrorMiddleware(raising(error), format="envelope"))
    response = await call(app, http_scope("/orders/42/pay", method="POST"))

    assert response.status == 409
    assert response.header_list("content-type") == ["application/json"]
    assert int(response.headers["content-length"]) == len(response.body)
    document = response.json()
    assert set(document) == {"success", "error", "meta"}
    assert document["success"] is False
    assert document["error"] == {
        "code": "conflict",
        "message": "Order already paid",
        "status": 409,
        "details": {"order": 42},
    }
    assert set(document["meta"]) == {"request_id", "timestamp"}
    assert document["meta"]["request_id"] == response.headers["x-request-id"]
    assert TIMESTAMP.fullmatch(document["meta"]["timestamp"])


async def test_envelope_500_in_production_reveals_nothing() -> None:
    app = ErrorMiddleware(raising(RuntimeError(SECRET)), format="envelope", debug=False)
    response = await call(app)

    assert response.status == 500
    error = response.json()["error"]
    assert error == {
        "code": "internal_server_error",
        "message": "Internal Server Error",
        "status": 500,
        "details": None,
    }
    assert b"hunter2" not in response.body


async def test_envelope_returned_error_is_rewritten() -> None:
    app = ErrorMiddleware(returning(404, b"Not here", headers=PLAIN), format="envelope")
    response = await call(app)
    assert response.status == 404
    error = response.json()["error"]
    assert (error["code"], error["message"], error["status"]) == ("not_found", "Not here", 404)


# --- AppError and its family ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_class", "status"),
    [
        (BadRequest, 400),
        (Unauthorized, 401),
        (Forbidden, 403),
        (NotFound, 404),
        (Conflict, 409),
        (UnprocessableEntity, 422),
        (TooManyRequests, 429),
        (ServiceUnavailable, 503),
        (AppError, 500),
    ],
)
def test_app_error_classes_have_their_status_title_and_code(
    error_class: type[AppError], status: int
) -> None:
    error = error_class()
    title = HTTPStatus(status).phrase
    assert error.status_code == status
    assert error.title == title
    assert error.code == "_".join(title.lower().split())
    assert error.detail is None
    assert str(error) == title
    assert repr(error) == f"{error_class.__name__}(status={status}, detail=None)"
    assert isinstance(error, AppError)


def test_app_error_options_override_the_defaults() -> None:
    error = NotFound("gone", status=410, code="order_archived", title="Order archived")
    assert (error.status_code, error.detail, error.code, error.title) == (
        410,
        "gone",
        "order_archived",
        "Order archived",
    )
    assert AppError(status=418, title="I'm a teapot").code == "i_m_a_teapot"


@pytest.mark.parametrize("status", [0, 200, 302, 399, 600, 999])
def test_app_error_status_outside_400_599_is_rejected(status: int) -> None:
    with pytest.raises(ValueError, match="between 400 and 599"):
        AppError(status=status)
    with pytest.raises(ValueError, match="between 400 and 599"):
        NotFound(status=status)


@pytest.mark.parametrize("status", [400, 599])
def test_app_error_status_bounds_are_inclusive(status: int) -> None:
    assert AppError(status=status).status_code == status


async def test_app_error_is_rendered_with_headers_and_extra() -> None:
    error = Unauthorized(
        "Token expired",
        code="token_expired",
        title="Authentication required",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"', "Cache-Control": "no-store"},
        extra={"realm": "api", "scopes": ["read"], "status": 200, "type": "https://evil"},
    )
    response = await call(ErrorMiddleware(raising(error)), http_scope("/me"))

    problem = assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert response.headers["cache-control"] == "no-store"
    assert problem["title"] == "Authentication required"
    assert problem["detail"] == "Token expired"
    assert problem["code"] == "token_expired"
    assert problem["instance"] == "/me"
    assert problem["realm"] == "api"
    assert problem["scopes"] == ["read"]
    # Extension members never override the standard ones.
    assert problem["type"] == "about:blank"


async def test_app_error_5xx_is_answered_without_a_traceback_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = await call(ErrorMiddleware(raising(ServiceUnavailable("Draining"))))
    assert assert_problem(response, 503)["detail"] == "Draining"
    assert all(r.exc_info is None for r in error_records(caplog))


async def test_raised_header_values_with_cr_or_lf_are_dropped() -> None:
    error = BadRequest(
        headers={
            "X-Injected": "a\r\nSet-Cookie: session=stolen",
            "X-Newline": "a\nb",
            "X-Good": "kept",
            "X-Unicode": "caf\u00e9\u2603",
        }
    )
    response = await call(ErrorMiddleware(raising(error)))

    assert_problem(response, 400)
    assert response.headers["x-good"] == "kept"
    for name in ("x-injected", "x-newline", "set-cookie", "x-unicode"):
        assert name not in response.headers
    assert all(b"\r" not in v and b"\n" not in v for _, v in response.start["headers"])


async def test_returned_header_values_with_cr_or_lf_are_dropped() -> None:
    headers = [
        (b"content-type", b"text/plain"),
        (b"x-injected", b"a\r\nSet-Cookie: session=stolen"),
        (b"bad name", b"x"),
        (b"x-good", b"kept"),
    ]
    response = await call(ErrorMiddleware(returning(404, b"Not Found", headers=headers)))

    assert_problem(response, 404)
    assert response.headers["x-good"] == "kept"
    assert "x-injected" not in response.headers
    assert "bad name" not in response.headers
    assert "set-cookie" not in response.headers


# --- Starlette --------------------------------------------------------------------------------


async def starlette_boom(request: Request) -> PlainTextResponse:
    raise RuntimeError(SECRET)


async def starlette_teapot(request: Request) -> PlainTextResponse:
    raise HTTPException(418, detail="short and stout", headers={"X-Tip": "pour me out"})


async def starlette_ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def failing_task() -> None:
    raise RuntimeError("background task failed")


async def starlette_with_failing_task(request: Request) -> PlainTextResponse:
    return PlainTextResponse("done", background=BackgroundTask(failing_task))


async def starlette_maintenance(request: Request) -> PlainTextResponse:
    return PlainTextResponse(
        "Down for maintenance",
        status_code=503,
        headers={"Retry-After": "120"},
        background=BackgroundTask(failing_task),
    )


starlette_app = Starlette(
    routes=[
        Mount(
            "/api",
            routes=[
                Route("/boom", starlette_boom),
                Route("/teapot", starlette_teapot),
                Route("/things", starlette_ok, methods=["GET"]),
                Route("/background", starlette_with_failing_task),
                Route("/maintenance", starlette_maintenance),
            ],
        )
    ]
)


async def test_starlette_unhandled_exception_becomes_our_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = RequestIdMiddleware(ErrorMiddleware(starlette_app, debug=False))
    # Starlette's ServerErrorMiddleware sends its plain-text 500, then re-raises: the call
    # returning at all shows the exception stopped at ErrorMiddleware.
    response = await call(app, http_scope("/api/boom"))

    assert len([m for m in response.messages if m["type"] == "http.response.start"]) == 1
    problem = assert_problem(response, 500)
    assert problem["instance"] == "/api/boom"
    assert problem["request_id"] == response.headers["x-request-id"]
    assert b"Internal Server Error" in response.body
    assert b"hunter2" not in response.body
    [record] = error_records(caplog)
    assert vars(record)["request_id"] == problem["request_id"]


async def test_starlette_unhandled_exception_over_httpx() -> None:
    async with client_for(RequestIdMiddleware(ErrorMiddleware(starlette_app))) as http:
        response = await http.get("/api/boom")  # raise_app_exceptions=True: would raise here
    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["request_id"] == response.headers["x-request-id"]


async def test_starlette_unknown_path_becomes_problem() -> None:
    async with client_for(ErrorMiddleware(starlette_app)) as http:
        response = await http.get("/api/nowhere")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert (problem["title"], problem["code"], problem["instance"]) == (
        "Not Found",
        "not_found",
        "/api/nowhere",
    )


async def test_starlette_wrong_method_keeps_allow() -> None:
    async with client_for(ErrorMiddleware(starlette_app)) as http:
        response = await http.delete("/api/things")
    assert response.status_code == 405
    assert response.headers["content-type"] == PROBLEM
    assert "GET" in response.headers["allow"]
    assert response.json()["code"] == "method_not_allowed"


async def test_starlette_http_exception_keeps_detail_and_headers() -> None:
    async with client_for(ErrorMiddleware(starlette_app)) as http:
        response = await http.get("/api/teapot")
    assert response.status_code == 418
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["x-tip"] == "pour me out"
    assert response.json()["detail"] == "short and stout"


async def test_starlette_failing_background_task_sends_nothing_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = await call(ErrorMiddleware(starlette_app), http_scope("/api/background"))

    assert response.status == 200
    assert response.body == b"done"
    [record] = error_records(caplog)
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "background task failed"


async def test_completed_503_with_failing_background_task_keeps_its_status_and_headers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The app's 503 response was complete when its background task failed: like any complete
    # response, it must be kept (rewritten, its headers kept) and the exception only logged.
    response = await call(ErrorMiddleware(starlette_app), http_scope("/api/maintenance"))

    problem = assert_problem(response, 503)
    assert problem["detail"] == "Down for maintenance"
    assert response.headers["retry-after"] == "120"
    assert len(error_records(caplog)) == 1


# --- FastAPI ----------------------------------------------------------------------------------


fastapi_app = FastAPI()


@fastapi_app.get("/items/{item_id}")
async def read_item(item_id: int) -> dict[str, int]:
    if item_id != 1:
        raise FastAPIHTTPException(404, detail="Item not found")
    return {"item_id": item_id}


@fastapi_app.post("/users")
async def create_user() -> None:
    raise FastAPIHTTPException(409, detail={"field": "email", "reason": "taken"})


async def test_fastapi_http_exception_detail() -> None:
    async with client_for(ErrorMiddleware(fastapi_app)) as http:
        found = await http.get("/items/1")
        missing = await http.get("/items/2")
    assert found.json() == {"item_id": 1}
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM
    problem = missing.json()
    assert (problem["detail"], problem["code"], problem["instance"]) == (
        "Item not found",
        "not_found",
        "/items/2",
    )


async def test_fastapi_validation_error_has_errors() -> None:
    async with client_for(ErrorMiddleware(fastapi_app)) as http:
        response = await http.get("/items/abc")
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == 422
    [error] = problem["errors"]
    assert error["loc"] == ["path", "item_id"]
    assert error["input"] == "abc"


async def test_fastapi_http_exception_with_structured_detail_keeps_it() -> None:
    # FastAPI allows any JSON detail; raised outside FastAPI it becomes ``details`` (see
    # test_raised_http_exception_with_structured_detail_keeps_it), so it must here too.
    async with client_for(ErrorMiddleware(fastapi_app)) as http:
        response = await http.post("/users")
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["details"] == {"field": "email", "reason": "taken"}


# --- raised by raw ASGI apps ------------------------------------------------------------------


async def test_raised_http_exception_keeps_headers() -> None:
    app = ErrorMiddleware(raising(HTTPException(405, headers={"Allow": "GET"})))
    response = await call(app, http_scope("/things", method="DELETE"))

    problem = assert_problem(response, 405)
    assert response.headers["allow"] == "GET"
    assert (problem["title"], problem["code"]) == ("Method Not Allowed", "method_not_allowed")


async def test_raised_http_exception_keeps_its_detail() -> None:
    app = ErrorMiddleware(raising(HTTPException(409, detail="Version mismatch")))
    assert assert_problem(await call(app), 409)["detail"] == "Version mismatch"


async def test_raised_http_exception_with_structured_detail_keeps_it() -> None:
    detail = {"field": "email", "reason": "taken"}
    app = ErrorMiddleware(raising(FastAPIHTTPException(409, detail=detail)))
    problem = assert_problem(await call(app), 409)
    assert problem["details"] == detail
    assert "detail" not in problem


async def test_raised_validation_error_has_errors() -> None:
    errors = [{"type": "missing", "loc": ("query", "q"), "msg": "Field required", "input": None}]
    response = await call(ErrorMiddleware(raising(RequestValidationError(errors))))
    problem = assert_problem(response, 422)
    assert problem["detail"] == "Request validation failed"
    assert problem["errors"] == [{**errors[0], "loc": ["query", "q"]}]


async def test_raised_app_error_in_raw_app() -> None:
    response = await call(ErrorMiddleware(raising(NotFound("No such user"))), http_scope("/u/7"))
    problem = assert_problem(response, 404)
    assert (problem["detail"], problem["instance"]) == ("No such user", "/u/7")


@pytest.mark.parametrize(
    ("retry_after", "header"), [(2.3, "3"), (0.01, "1"), (0.0, "1"), (5.0, "5")]
)
async def test_circuit_open_answers_503_with_retry_after(retry_after: float, header: str) -> None:
    app = ErrorMiddleware(raising(CircuitOpenError("payments", retry_after=retry_after)))
    response = await call(app)

    problem = assert_problem(response, 503)
    assert response.header_list("retry-after") == [header]
    assert problem["code"] == "circuit_open"
    assert "payments" not in response.body.decode()


# --- error responses the application returned -----------------------------------------------


async def test_returned_json_detail_becomes_detail() -> None:
    body = json.dumps({"detail": "x", "hint": "try again"}).encode()
    app = returning(400, body, headers=[(b"content-type", b"application/json")])
    problem = assert_problem(await call(ErrorMiddleware(app), http_scope("/q")), 400)
    assert problem["detail"] == "x"
    assert problem["hint"] == "try again"
    assert (problem["title"], problem["code"], problem["instance"]) == (
        "Bad Request",
        "bad_request",
        "/q",
    )


async def test_returned_json_detail_list_becomes_errors() -> None:
    errors = [{"loc": ["body", "name"], "msg": "Field required"}]
    body = json.dumps({"detail": errors}).encode()
    app = returning(422, body, headers=[(b"content-type", b"application/json")])
    problem = assert_problem(await call(ErrorMiddleware(app)), 422)
    assert problem["errors"] == errors


async def test_returned_plain_text_becomes_detail() -> None:
    app = returning(
        409, b"Already ", b"exists\n", headers=content_type(b"text/plain; charset=utf-8")
    )
    response = await call(ErrorMiddleware(app))
    assert assert_problem(response, 409)["detail"] == "Already exists"


async def test_returned_html_has_no_detail() -> None:
    app = returning(404, b"<h1>Not Found</h1>", headers=content_type(b"text/html; charset=utf-8"))
    response = await call(ErrorMiddleware(app))
    problem = assert_problem(response, 404)
    assert "detail" not in problem
    assert b"<h1>" not in response.body


@pytest.mark.parametrize(
    ("body", "media_type"),
    [
        (b"{not json", b"application/json"),
        (b'["a", "list"]', b"application/json"),
        (b"x" * 1001, b"text/plain"),  # too long to be a detail
        (b"No such thing", None),  # no content type
    ],
)
async def test_returned_body_without_a_usable_detail_has_none(
    body: bytes, media_type: bytes | None
) -> None:
    headers = content_type(media_type) if media_type else []
    response = await call(ErrorMiddleware(returning(404, body, headers=headers)))
    problem = assert_problem(response, 404)
    assert "detail" not in problem
    assert body not in response.body


async def test_returned_error_keeps_its_other_headers() -> None:
    headers = [*PLAIN, (b"content-length", b"9"), (b"allow", b"GET, HEAD")]
    response = await call(ErrorMiddleware(returning(405, b"Not here!", headers=headers)))
    assert_problem(response, 405)  # one content-type, a content-length matching the new body
    assert response.headers["allow"] == "GET, HEAD"


def untouched_cases() -> list[Any]:
    problem = b'{"type":"about:blank","title":"Gone","status":410}'
    return [
        pytest.param(
            returning(
                410,
                problem[:20],
                problem[20:],
                headers=content_type(b"application/problem+json; x=y"),
            ),
            http_scope(),
            id="already-problem-json",
        ),
        pytest.param(
            returning(
                404,
                gzip.compress(b"Not Found"),
                headers=[*PLAIN, (b"content-encoding", b"gzip")],
            ),
            http_scope(),
            id="content-encoded",
        ),
        pytest.param(
            returning(404, b"Not Found", headers=PLAIN),
            http_scope(method="HEAD"),
            id="head",
        ),
    ]


@pytest.mark.parametrize(("app", "scope"), untouched_cases())
async def test_returned_error_is_left_untouched(app: ASGIApp, scope: Scope) -> None:
    expected = Server()
    await app(http_scope(), expected.receive, expected.send)
    response = await call(ErrorMiddleware(app), scope)
    assert response.messages == expected.messages


async def test_returned_error_is_untouched_when_rewriting_is_off() -> None:
    app = returning(404, b"Not Found", headers=PLAIN)
    response = await call(ErrorMiddleware(app, rewrite_responses=False))
    assert response.messages == (await call(app)).messages
    # Raised errors are still converted.
    raised = await call(ErrorMiddleware(raising(NotFound()), rewrite_responses=False))
    assert_problem(raised, 404)


async def test_returned_error_sent_with_pathsend_passes_through() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": list(PLAIN)})
        await send({"type": "http.response.pathsend", "path": "/srv/404.txt"})

    response = await call(
        ErrorMiddleware(app), http_scope(extensions={"http.response.pathsend": {}})
    )
    assert response.messages == [
        {"type": "http.response.start", "status": 404, "headers": PLAIN},
        {"type": "http.response.pathsend", "path": "/srv/404.txt"},
    ]


@pytest.mark.parametrize("chunks", [[b"x" * 11], [b"abcdefgh", b"ijklmnop", b"qrst"]])
async def test_body_larger_than_max_body_size_passes_unchanged(chunks: list[bytes]) -> None:
    headers = PLAIN
    response = await call(
        ErrorMiddleware(returning(404, *chunks, headers=headers), max_body_size=10)
    )

    assert response.status == 404
    assert response.start["headers"] == headers
    assert response.body == b"".join(chunks)
    assert response.body_messages[-1]["more_body"] is False
    assert all(m["more_body"] for m in response.body_messages[:-1])


async def test_body_of_exactly_max_body_size_is_rewritten() -> None:
    app = returning(404, b"x" * 10, headers=PLAIN)
    assert_problem(await call(ErrorMiddleware(app, max_body_size=10)), 404)


async def test_success_response_streams_through_untouched() -> None:
    app = returning(200, b"one", b"two", headers=PLAIN)
    server = Server()
    await ErrorMiddleware(app)(http_scope(), server.receive, server.send)
    assert server.messages == (await call(app)).messages


async def test_returned_4xx_is_sent_as_soon_as_the_body_ends() -> None:
    server = Server()
    sent_when_body_ended: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": list(PLAIN)})
        await send({"type": "http.response.body", "body": b"No such ", "more_body": True})
        sent_when_body_ended.append(len(server.messages))
        await send({"type": "http.response.body", "body": b"widget"})
        sent_when_body_ended.append(len(server.messages))

    await ErrorMiddleware(app)(http_scope(), server.receive, server.send)
    assert sent_when_body_ended == [0, 2]
    assert assert_problem(server.response, 404)["detail"] == "No such widget"


async def test_returned_text_equal_to_the_title_adds_no_detail() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": list(PLAIN)})
        await send({"type": "http.response.body", "body": b"Not Found"})

    server = Server()
    await ErrorMiddleware(app)(http_scope(), server.receive, server.send)
    assert "detail" not in assert_problem(server.response, 404)


async def test_a_framework_500_page_is_held_until_the_app_returns() -> None:
    server = Server()
    sent_when_body_ended: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": list(PLAIN)})
        await send({"type": "http.response.body", "body": b"Internal Server Error"})
        sent_when_body_ended.append(len(server.messages))

    await ErrorMiddleware(app)(http_scope(), server.receive, server.send)
    assert sent_when_body_ended == [0]
    assert "detail" not in assert_problem(server.response, 500)


async def test_an_app_500_goes_out_before_its_background_task() -> None:
    from starlette.background import BackgroundTask

    server = Server()
    sent_before_task: list[int] = []

    async def task() -> None:
        sent_before_task.append(len(server.messages))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": "Upstream down"}, 500, background=BackgroundTask(task))
        await response(scope, receive, send)

    await ErrorMiddleware(app)(http_scope(), server.receive, server.send)
    assert sent_before_task == [2]  # start and body already with the client
    assert "detail" not in assert_problem(server.response, 500)  # production: nothing of it


@pytest.mark.parametrize("debug", [False, True])
async def test_a_returned_500_body_is_shown_only_in_debug(debug: bool) -> None:
    traceback_text = b"Traceback (most recent call last):\n  db password is hunter2"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": list(PLAIN)})
        await send({"type": "http.response.body", "body": traceback_text})

    response = await call(ErrorMiddleware(app, debug=debug))
    body = assert_problem(response, 500)
    assert ("hunter2" in body.get("detail", "")) is debug


async def test_returned_502_is_sent_as_soon_as_the_body_ends() -> None:
    server = Server()
    sent_when_body_ended: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 502, "headers": list(PLAIN)})
        await send({"type": "http.response.body", "body": b"Upstream down"})
        sent_when_body_ended.append(len(server.messages))

    await ErrorMiddleware(app)(http_scope(), server.receive, server.send)
    assert sent_when_body_ended == [2]
    assert assert_problem(server.response, 502)["detail"] == "Upstream down"


async def test_response_rendered_by_render_error_is_not_rewritten() -> None:
    async def rate_limited(scope: Scope, receive: Receive, send: Send) -> None:
        start, body = render_error(
            RequestContext.current(), scope, 429, detail="slow down", error_format="envelope"
        )
        await send(start)
        await send(body)

    response = await call(ErrorMiddleware(rate_limited))  # format="problem"
    assert response.status == 429
    assert response.header_list("content-type") == ["application/json"]
    assert response.json()["error"]["message"] == "slow down"


# --- exceptions once the response started -----------------------------------------------------


async def test_exception_after_the_response_started_reaches_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exc = RuntimeError("stream broke")

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(PLAIN)})
        await send({"type": "http.response.body", "body": b"first chunk", "more_body": True})
        raise exc

    server = Server()
    app = RequestIdMiddleware(ErrorMiddleware(streaming))
    with pytest.raises(RuntimeError) as raised:
        await app(http_scope("/stream"), server.receive, server.send)

    assert raised.value is exc
    response = server.response  # exactly one http.response.start
    assert response.status == 200
    assert response.body == b"first chunk"
    assert len(response.body_messages) == 1
    [record] = error_records(caplog)
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[1] is exc
    assert vars(record)["request_id"] == response.headers["x-request-id"]


async def test_exception_after_the_response_completed_is_logged_and_swallowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exc = RuntimeError("background task failed")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"created"})
        raise exc

    response = await call(ErrorMiddleware(app))

    assert response.status == 201
    assert response.body == b"created"
    assert len(response.messages) == 2
    [record] = error_records(caplog)
    assert record.exc_info is not None and record.exc_info[1] is exc
    assert hasattr(record, "request_id")


async def test_exception_after_a_rewritten_4xx_sends_nothing_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    not_found = returning(404, b"Not Found", headers=PLAIN)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await not_found(scope, receive, send)
        raise RuntimeError("cleanup failed")

    response = await call(ErrorMiddleware(app))
    assert "detail" not in assert_problem(response, 404)  # the title says it already
    assert len(response.messages) == 2
    assert len(error_records(caplog)) == 1


async def test_nested_error_middlewares_log_an_exception_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(PLAIN)})
        await send({"type": "http.response.body", "body": b"first chunk", "more_body": True})
        raise RuntimeError("stream broke")

    with pytest.raises(RuntimeError, match="stream broke"):
        await call(ErrorMiddleware(ErrorMiddleware(streaming)))
    assert len(error_records(caplog)) == 1


async def test_exception_seen_by_an_inner_access_log_is_still_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The access log records the exception on the request context (its type only, no
    # traceback); that must not count as "already logged" for ErrorMiddleware.
    exc = RuntimeError("boom")
    response = await call(ErrorMiddleware(AccessLogMiddleware(raising(exc))))

    assert_problem(response, 500)
    [record] = error_records(caplog)
    assert record.exc_info is not None and record.exc_info[1] is exc


async def test_custom_logger_receives_the_record(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.errors.custom")
    caplog.set_level(logging.ERROR, logger=logger.name)
    await call(ErrorMiddleware(raising(RuntimeError("boom")), logger=logger))
    assert [r.name for r in caplog.records if r.exc_info] == [logger.name]


# --- other scopes and options -----------------------------------------------------------------


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan"])
async def test_other_scopes_pass_through_unchanged(scope_type: str) -> None:
    seen: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))
        raise OSError("not ours to handle")

    server = Server()
    scope: Scope = {"type": scope_type, "asgi": {"version": "3.0"}, "path": "/ws"}
    with pytest.raises(OSError, match="not ours to handle"):
        await ErrorMiddleware(app)(scope, server.receive, server.send)

    [(seen_scope, seen_receive, seen_send)] = seen
    assert seen_scope is scope
    assert seen_scope == {"type": scope_type, "asgi": {"version": "3.0"}, "path": "/ws"}
    assert CONTEXT_KEY not in seen_scope
    assert seen_receive == server.receive
    assert seen_send == server.send
    assert server.messages == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "xml"}, "format must be 'problem' or 'envelope'"),
        ({"max_body_size": -1}, "max_body_size must be a whole number >= 0"),
    ],
)
def test_invalid_options_raise_value_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ErrorMiddleware(returning(200), **options)


# --- render_error -------------------------------------------------------------------------------


def test_render_error_without_context_is_a_problem() -> None:
    start, body = render_error(
        None, http_scope("/limited"), 429, detail="slow down", headers=[(b"retry-after", b"5")]
    )
    response = Response([start, body])
    problem = assert_problem(response, 429)
    assert problem == {
        "type": "about:blank",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "slow down",
        "instance": "/limited",
        "code": "too_many_requests",
        "request_id": None,
    }
    assert response.headers["retry-after"] == "5"
    assert body["more_body"] is False


def test_render_error_shows_exception_details_only_in_debug() -> None:
    scope = http_scope()
    context = RequestContext(scope)
    exc = ValueError(SECRET)

    _, quiet = render_error(context, scope, 500, exception=exc)
    assert b"hunter2" not in quiet["body"]
    assert context.error_rendered is True

    context.debug = True
    _, loud = render_error(context, scope, 500, exception=exc, error_format="envelope")
    error = json.loads(loud["body"])["error"]
    assert error["exception"]["type"] == "builtins.ValueError"
    assert error["exception"]["message"] == SECRET


def test_app_error_status_is_the_instance_status() -> None:
    assert AppError(status=418).status == 418
    assert NotFound(status=410).status == 410 == NotFound(status=410).status_code
    assert NotFound().status == 404


def test_a_subclass_may_fix_its_status_with_a_plain_status_attribute() -> None:
    class PaymentRequired(AppError):
        status = 402

    error = PaymentRequired("pay first")
    assert error.status_code == 402 == error.status
    assert error.title == "Payment Required"
    assert PaymentRequired.default_status == 402


@pytest.mark.parametrize(
    "headers",
    [list(PLAIN), [(b"content-type", b"text/plain"), (b"content-encoding", b"gzip")]],
    ids=["oversized", "encoded"],
)
async def test_a_production_500_body_never_goes_out(headers: list[tuple[bytes, bytes]]) -> None:
    secret = b"Traceback: db password is hunter2\n" * 2000  # 68 kB, above max_body_size

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        for offset in range(0, len(secret), 8192):
            chunk = secret[offset : offset + 8192]
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    response = await call(ErrorMiddleware(app, debug=False))
    assert b"hunter2" not in response.body
    assert "detail" not in assert_problem(response, 500)
