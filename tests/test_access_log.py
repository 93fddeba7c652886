from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from asgi_resilience import (
    AccessLogMiddleware,
    ErrorMiddleware,
    JsonFormatter,
    RequestIdMiddleware,
)
from asgi_resilience import access_log as access_log_module
from asgi_resilience import context as context_module
from asgi_resilience.context import CONTEXT_KEY
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send
from tests.asgi import call, client_for, http_scope
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

LOGGER = "asgi_resilience.access"
BASE_FIELDS = {
    "request_id",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "ttfb_ms",
    "bytes_sent",
    "client",
    "user_agent",
    "http_version",
}


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def only_record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    records = access_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    return records[0]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return record.__dict__


def raw_app(
    body: Sequence[bytes] = (b"hello",),
    *,
    status: int = 200,
    headers: Sequence[tuple[bytes, bytes]] = ((b"content-type", b"text/plain"),),
) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        for index, chunk in enumerate(body):
            more_body = index < len(body) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more_body})

    return app


async def noop_receive() -> Message:
    return {"type": "http.disconnect"}


# --- a Starlette app -------------------------------------------------------------------------


async def read_item(request: Request) -> JSONResponse:
    return JSONResponse({"item_id": request.path_params["item_id"]})


async def read_user(request: Request) -> JSONResponse:
    return JSONResponse({"user_id": request.path_params["user_id"]})


# Durations are read from perf_counter by the request's context and the access log: these tests
# give both a clock that moves only when an app says time has passed (MEASURED.advance).
MEASURED = FakeClock()


@pytest.fixture(autouse=True)
def _measured_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context_module, "perf_counter", MEASURED)
    monkeypatch.setattr(access_log_module, "perf_counter", MEASURED)


async def slow(request: Request) -> PlainTextResponse:
    MEASURED.advance(0.08)  # the handler took 80 ms
    return PlainTextResponse("slow")


async def not_found(request: Request) -> PlainTextResponse:
    return PlainTextResponse("gone", status_code=404)


async def broken(request: Request) -> PlainTextResponse:
    return PlainTextResponse("oops", status_code=503)


background_done: list[float] = []


async def slow_background() -> None:
    MEASURED.advance(0.3)  # long enough to tell apart from the request's measured duration
    background_done.append(MEASURED())


async def with_background(request: Request) -> PlainTextResponse:
    return PlainTextResponse("done", background=BackgroundTask(slow_background))


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/items/{item_id}", read_item),
            Route("/slow", slow),
            Route("/gone", not_found),
            Route("/broken", broken),
            Route("/background", with_background),
            Route("/health", read_item),
            Route("/healthcheck", read_item),
            Mount("/api", routes=[Route("/users/{user_id:int}", read_user)]),
        ]
    )


async def request(app: ASGIApp, path: str, *, method: str = "GET", **kwargs: Any) -> httpx.Response:
    async with client_for(app) as client:
        return await client.request(method, path, **kwargs)


# --- the record ------------------------------------------------------------------------------


async def test_one_record_with_every_field(caplog: pytest.LogCaptureFixture) -> None:
    app = RequestIdMiddleware(AccessLogMiddleware(starlette_app()))

    response = await request(
        app, "/items/42?secret=1", headers={"User-Agent": "probe/1.0", "X-Request-ID": "req-1"}
    )

    record = only_record(caplog)
    extra = fields(record)
    assert BASE_FIELDS <= set(extra)
    assert extra["request_id"] == "req-1" == response.headers["x-request-id"]
    assert extra["method"] == "GET"
    assert extra["path"] == "/items/42"
    assert extra["route"] == "/items/{item_id}"
    assert extra["status"] == 200
    assert extra["bytes_sent"] == len(response.content) > 0
    assert extra["client"] == "127.0.0.1"
    assert extra["user_agent"] == "probe/1.0"
    assert extra["http_version"] == "1.1"
    assert isinstance(extra["duration_ms"], float)
    assert isinstance(extra["ttfb_ms"], float)
    assert 0 <= extra["ttfb_ms"] <= extra["duration_ms"] < 1000
    assert "query" not in extra
    assert "error" not in extra
    assert "disconnected" not in extra
    assert record.levelno == logging.INFO
    assert re.fullmatch(r"GET /items/42 200 \d+\.\dms", record.getMessage())


async def test_exactly_one_record_per_request(caplog: pytest.LogCaptureFixture) -> None:
    app = AccessLogMiddleware(starlette_app())

    for item in range(3):
        await request(app, f"/items/{item}")

    records = access_records(caplog)
    assert [fields(r)["path"] for r in records] == ["/items/0", "/items/1", "/items/2"]


async def test_stacked_with_request_id_and_errors_still_one_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = RequestIdMiddleware(AccessLogMiddleware(ErrorMiddleware(starlette_app())))

    response = await request(app, "/items/1")

    assert fields(only_record(caplog))["request_id"] == response.headers["x-request-id"]


async def test_no_user_agent_and_no_request_id_are_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await call(AccessLogMiddleware(raw_app()), http_scope("/x"))

    extra = fields(only_record(caplog))
    assert extra["user_agent"] is None
    assert extra["request_id"] is None
    assert extra["route"] == "<unmatched>"  # a raw app sets no route


async def test_bytes_sent_counts_every_streamed_chunk(caplog: pytest.LogCaptureFixture) -> None:
    chunks = [b"a" * 10, b"", b"b" * 7, b"c"]
    response = await call(AccessLogMiddleware(raw_app(chunks)))

    assert fields(only_record(caplog))["bytes_sent"] == len(response.body) == 18


async def test_route_of_mounted_app_is_the_full_template(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await request(AccessLogMiddleware(starlette_app()), "/api/users/5")

    assert fields(only_record(caplog))["route"] == "/api/users/{user_id}"


async def test_unmatched_path_has_unmatched_route(caplog: pytest.LogCaptureFixture) -> None:
    response = await request(AccessLogMiddleware(starlette_app()), "/nowhere")

    record = only_record(caplog)
    assert response.status_code == 404
    assert fields(record)["route"] == "<unmatched>"
    assert fields(record)["status"] == 404
    assert record.levelno == logging.WARNING


async def test_query_only_when_enabled(caplog: pytest.LogCaptureFixture) -> None:
    scope = http_scope("/q", query_string=b"token=abc&page=2")

    await call(AccessLogMiddleware(raw_app()), scope)
    await call(AccessLogMiddleware(raw_app(), include_query=True), scope)

    without, with_query = access_records(caplog)
    assert "query" not in fields(without)
    assert "abc" not in json.dumps(fields(without), default=str)
    assert fields(with_query)["query"] == "token=abc&page=2"


async def test_custom_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.custom_access")
    caplog.set_level(logging.INFO, logger="tests.custom_access")

    await call(AccessLogMiddleware(raw_app(), logger=logger))

    assert access_records(caplog) == []
    assert [r.name for r in caplog.records] == ["tests.custom_access"]


async def test_no_record_when_the_level_is_disabled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    await call(AccessLogMiddleware(raw_app()))
    await call(AccessLogMiddleware(raw_app(status=404)))

    assert [fields(r)["status"] for r in access_records(caplog)] == [404]


# --- levels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "level"),
    [
        (200, logging.INFO),
        (201, logging.INFO),
        (302, logging.INFO),
        (400, logging.WARNING),
        (404, logging.WARNING),
        (429, logging.WARNING),
        (500, logging.ERROR),
        (503, logging.ERROR),
    ],
)
async def test_level_follows_status(
    caplog: pytest.LogCaptureFixture, status: int, level: int
) -> None:
    await call(AccessLogMiddleware(raw_app(status=status)))

    record = only_record(caplog)
    assert fields(record)["status"] == status
    assert record.levelno == level


async def test_levels_in_a_starlette_app(caplog: pytest.LogCaptureFixture) -> None:
    app = AccessLogMiddleware(starlette_app())

    for path in ("/items/1", "/gone", "/broken"):
        await request(app, path)

    records = access_records(caplog)
    assert [(fields(r)["status"], r.levelno) for r in records] == [
        (200, logging.INFO),
        (404, logging.WARNING),
        (503, logging.ERROR),
    ]


async def test_slow_success_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    app = AccessLogMiddleware(starlette_app(), slow_threshold=0.05)

    await request(app, "/slow")
    await request(app, "/items/1")

    slow_record, fast_record = access_records(caplog)
    assert slow_record.levelno == logging.WARNING
    assert fields(slow_record)["status"] == 200
    assert fields(slow_record)["duration_ms"] >= 50
    assert fast_record.levelno == logging.INFO
    assert fields(fast_record)["duration_ms"] < 50


async def test_slow_client_error_stays_a_warning_and_slow_server_error_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        MEASURED.advance(0.06)  # past slow_threshold
        await raw_app(status=int(scope["path"][1:]))(scope, receive, send)

    app = AccessLogMiddleware(slow_app, slow_threshold=0.05)
    await call(app, http_scope("/404"))
    await call(app, http_scope("/500"))

    assert [r.levelno for r in access_records(caplog)] == [logging.WARNING, logging.ERROR]


async def test_exception_mid_stream_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("lost the database")

    with pytest.raises(RuntimeError, match="lost the database"):
        await call(AccessLogMiddleware(app))

    record = only_record(caplog)
    assert record.levelno == logging.ERROR
    assert fields(record)["status"] == 200
    assert fields(record)["error"] == "RuntimeError"
    assert fields(record)["bytes_sent"] == 4
    assert "disconnected" not in fields(record)


# --- excluded paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/health", "/health/", "/health/ready", "/health/live", "/livez", "/readyz", "/metrics"],
)
async def test_probe_paths_are_not_logged(caplog: pytest.LogCaptureFixture, path: str) -> None:
    response = await call(AccessLogMiddleware(raw_app()), http_scope(path))

    assert response.body == b"hello"
    assert access_records(caplog) == []


@pytest.mark.parametrize("path", ["/healthcheck", "/metricsx", "/", "/api/health"])
async def test_paths_beside_probes_are_logged(caplog: pytest.LogCaptureFixture, path: str) -> None:
    await call(AccessLogMiddleware(raw_app()), http_scope(path))

    assert fields(only_record(caplog))["path"] == path


async def test_exclude_paths_can_be_replaced(caplog: pytest.LogCaptureFixture) -> None:
    app = AccessLogMiddleware(raw_app(), exclude_paths=["/internal/"])

    for path in ("/internal", "/internal/x", "/health", "/internals"):
        await call(app, http_scope(path))

    assert [fields(r)["path"] for r in access_records(caplog)] == ["/health", "/internals"]


async def test_no_exclude_paths_logs_everything(caplog: pytest.LogCaptureFixture) -> None:
    await call(AccessLogMiddleware(raw_app(), exclude_paths=()), http_scope("/metrics"))

    assert fields(only_record(caplog))["path"] == "/metrics"


# --- timing ----------------------------------------------------------------------------------


async def test_duration_excludes_background_tasks(caplog: pytest.LogCaptureFixture) -> None:
    background_done.clear()
    started = MEASURED()

    response = await request(AccessLogMiddleware(starlette_app()), "/background")

    assert response.text == "done"
    assert len(background_done) == 1
    assert background_done[0] - started >= 0.29  # the task did run, after the response
    record = only_record(caplog)
    assert fields(record)["duration_ms"] < 150
    assert record.levelno == logging.INFO


async def test_duration_runs_until_the_last_body_byte(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        MEASURED.advance(0.06)  # between the first byte and the last
        await send({"type": "http.response.body", "body": b"x"})

    await call(AccessLogMiddleware(app, slow_threshold=10))

    extra = fields(only_record(caplog))
    assert extra["ttfb_ms"] < 50
    assert extra["duration_ms"] >= 55


# --- disconnects and exceptions --------------------------------------------------------------


async def test_app_returning_mid_stream_is_a_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})

    await call(AccessLogMiddleware(app))

    record = only_record(caplog)
    assert record.levelno == logging.WARNING
    assert fields(record)["disconnected"] is True
    assert fields(record)["status"] == 201
    assert fields(record)["bytes_sent"] == 3
    assert "error" not in fields(record)


async def test_send_raising_oserror_is_a_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await send({"type": "http.response.body", "body": b"second", "more_body": True})

    delivered: list[Message] = []

    async def send(message: Message) -> None:
        if len(delivered) == 2:
            raise OSError("client went away")
        delivered.append(message)

    with pytest.raises(OSError, match="client went away"):
        await AccessLogMiddleware(app)(http_scope(), noop_receive, send)

    record = only_record(caplog)
    assert record.levelno == logging.WARNING
    assert fields(record)["disconnected"] is True
    assert fields(record)["status"] == 200
    assert fields(record)["bytes_sent"] == len(b"first")
    assert fields(record)["error"] == "OSError"


async def test_send_of_the_start_failing_records_no_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def send(message: Message) -> None:
        raise OSError("client went away")

    with pytest.raises(OSError):
        await AccessLogMiddleware(raw_app(status=200))(http_scope(), noop_receive, send)

    record = only_record(caplog)
    assert fields(record)["disconnected"] is True
    assert record.levelno == logging.WARNING
    # Nothing reached the client: no status was really sent.
    assert fields(record)["status"] is None


async def test_app_sending_nothing_has_no_status(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    response = await call(AccessLogMiddleware(app))

    assert response.messages == []
    record = only_record(caplog)
    assert fields(record)["status"] is None
    assert fields(record)["disconnected"] is True
    assert fields(record)["ttfb_ms"] is None
    assert fields(record)["bytes_sent"] == 0
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("GET / - ")


async def test_cancelled_request_is_a_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    with anyio.CancelScope() as server_gives_up:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            server_gives_up.cancel()  # as a server's timeout would, mid-response
            await anyio.sleep_forever()

        await call(AccessLogMiddleware(app))

    record = only_record(caplog)
    assert fields(record)["disconnected"] is True
    assert fields(record)["status"] == 200
    assert record.levelno == logging.WARNING


async def test_exception_before_the_response_is_a_500(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await call(AccessLogMiddleware(app))

    record = only_record(caplog)
    assert fields(record)["status"] == 500
    assert fields(record)["error"] == "ValueError"
    assert "disconnected" not in fields(record)
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith("GET / 500 ")


async def test_error_middleware_inside_logs_the_500_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class DatabaseDown(Exception):
        pass

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise DatabaseDown("db")

    response = await call(AccessLogMiddleware(ErrorMiddleware(app, debug=False)))

    assert response.status == 500
    record = only_record(caplog)
    assert record.levelno == logging.ERROR
    assert fields(record)["status"] == 500
    assert fields(record)["error"] == "DatabaseDown"
    assert fields(record)["bytes_sent"] == len(response.body)
    assert "disconnected" not in fields(record)


async def test_error_middleware_around_starlette_endpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fail(request: Request) -> PlainTextResponse:
        raise KeyError("missing")

    app = Starlette(routes=[Route("/fail/{name}", fail)])
    stack = AccessLogMiddleware(ErrorMiddleware(app, debug=False))

    response = await request(stack, "/fail/x")

    assert response.status_code == 500
    record = only_record(caplog)
    assert fields(record)["status"] == 500
    assert fields(record)["error"] == "KeyError"
    assert fields(record)["route"] == "/fail/{name}"
    assert record.levelno == logging.ERROR


# --- JsonFormatter ---------------------------------------------------------------------------


def make_record(
    message: str = "hello %s",
    args: tuple[Any, ...] = ("world",),
    *,
    extra: dict[str, Any] | None = None,
    exc_info: Any = None,
    level: int = logging.INFO,
) -> logging.LogRecord:
    logger = logging.getLogger("tests.formatter")
    return logger.makeRecord(logger.name, level, __file__, 1, message, args, exc_info, extra=extra)


def render(record: logging.LogRecord, **options: Any) -> dict[str, Any]:
    line = JsonFormatter(**options).format(record)
    assert "\n" not in line
    assert "\r" not in line
    document: dict[str, Any] = json.loads(line)
    return document


def test_formatter_renders_base_members_and_extras() -> None:
    record = make_record(extra={"request_id": "r1", "count": 3, "nested": {"a": [1, None]}})

    document = render(record)

    assert list(document)[:4] == ["timestamp", "level", "logger", "message"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", document["timestamp"])
    assert document["level"] == "INFO"
    assert document["logger"] == "tests.formatter"
    assert document["message"] == "hello world"
    assert document["request_id"] == "r1"
    assert document["count"] == 3
    assert document["nested"] == {"a": [1, None]}
    for attribute in ("args", "msg", "levelno", "pathname", "created", "exc_text", "thread"):
        assert attribute not in document
    assert "exc_info" not in document


def test_formatter_keeps_one_line_for_multiline_messages() -> None:
    record = make_record("line one\nline two %d\r\n", (2,), level=logging.WARNING)

    document = render(record)

    assert document["message"] == "line one\nline two 2\r\n"
    assert document["level"] == "WARNING"


def test_formatter_includes_exception_text() -> None:
    try:
        raise ValueError("broken\nbadly")
    except ValueError:
        record = make_record("failed", (), exc_info=sys.exc_info(), level=logging.ERROR)

    document = render(record)

    assert document["exc_info"].startswith("Traceback (most recent call last)")
    assert "ValueError: broken\nbadly" in document["exc_info"]
    assert document["message"] == "failed"
    assert document["level"] == "ERROR"


def test_formatter_includes_stack_info() -> None:
    record = make_record("here", ())
    record.stack_info = "Stack (most recent call last):\n  File x"

    assert render(record)["stack_info"] == "Stack (most recent call last):\n  File x"


def test_formatter_static_fields() -> None:
    static = {"service": "api", "version": "1.2"}
    record = make_record(extra={"request_id": "r"})

    document = render(record, static_fields=static)

    assert document["service"] == "api"
    assert document["version"] == "1.2"
    assert document["request_id"] == "r"
    static["service"] = "changed"  # the formatter kept its own copy
    assert render(record, static_fields={"service": "api"})["service"] == "api"


def test_formatter_renders_unserialisable_values_with_str() -> None:
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    record = make_record(
        "value %s", (Thing(),), extra={"thing": Thing(), "raw": b"\x00bytes", "items": {1}}
    )

    document = render(record)

    assert document["message"] == "value a thing"
    assert document["thing"] == "a thing"
    assert document["raw"] == str(b"\x00bytes")
    assert document["items"] == "{1}"


def test_formatter_renders_dict_with_non_string_keys() -> None:
    record = make_record(extra={"by_route": {("GET", "/items"): 3}})

    document = render(record)

    assert "by_route" in document
    assert "GET" in json.dumps(document["by_route"])


def test_formatter_non_ascii_stays_readable() -> None:
    document = render(make_record("café %s", ("☕",), extra={"city": "Zürich"}))

    assert document["message"] == "café ☕"
    assert document["city"] == "Zürich"


async def test_access_record_round_trips_through_json_formatter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = RequestIdMiddleware(AccessLogMiddleware(starlette_app(), include_query=True))

    response = await request(app, "/items/9?page=1", headers={"User-Agent": "ua"})

    record = only_record(caplog)
    document = render(record, static_fields={"service": "shop"})
    assert BASE_FIELDS | {"query", "timestamp", "level", "logger", "message", "service"} <= set(
        document
    )
    assert document["logger"] == LOGGER
    assert document["level"] == "INFO"
    assert document["message"] == record.getMessage()
    assert document["message"].startswith("GET /items/9 200 ")
    assert document["request_id"] == response.headers["x-request-id"]
    assert document["route"] == "/items/{item_id}"
    assert document["status"] == 200
    assert document["bytes_sent"] == len(response.content)
    assert document["query"] == "page=1"
    assert document["user_agent"] == "ua"
    assert document["service"] == "shop"
    assert document["timestamp"].endswith("Z")


async def test_failed_access_record_round_trips_with_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise LookupError("nope")

    with pytest.raises(LookupError):
        await call(AccessLogMiddleware(app))

    document = render(only_record(caplog))
    assert document["status"] == 500
    assert document["error"] == "LookupError"
    assert document["level"] == "ERROR"


# --- other scopes and options ----------------------------------------------------------------


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan"])
async def test_other_scopes_pass_through(caplog: pytest.LogCaptureFixture, scope_type: str) -> None:
    seen: list[Scope] = []
    sent: list[Message] = []
    outgoing: Message = {"type": f"{scope_type}.whatever"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await send(outgoing)

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": scope_type, "path": "/ws", "headers": []}
    await AccessLogMiddleware(app)(scope, noop_receive, send)

    assert len(seen) == 1
    assert seen[0] is scope
    assert CONTEXT_KEY not in scope
    assert sent == [outgoing]
    assert sent[0] is outgoing
    assert access_records(caplog) == []


@pytest.mark.parametrize("threshold", [0, 0.0, -1, "1s", None, float("inf")])
def test_a_bad_slow_threshold_is_a_value_error_naming_it(threshold: Any) -> None:
    with pytest.raises(ValueError, match="slow_threshold must be a number of seconds > 0"):
        AccessLogMiddleware(raw_app(), slow_threshold=threshold)


def test_nan_slow_threshold_is_rejected() -> None:
    with pytest.raises(ValueError, match="slow_threshold"):
        AccessLogMiddleware(raw_app(), slow_threshold=float("nan"))


@pytest.mark.parametrize("path", ["health", "", "metrics/"])
def test_exclude_path_without_leading_slash_is_rejected(path: str) -> None:
    with pytest.raises(ValueError, match="start with '/'"):
        AccessLogMiddleware(raw_app(), exclude_paths=["/livez", path])


def test_formatter_renders_circular_values_with_str() -> None:
    cycle: dict[str, object] = {}
    cycle["self"] = cycle
    record = logging.makeLogRecord({"name": "app", "levelname": "INFO", "msg": "x", "cycle": cycle})
    line = json.loads(JsonFormatter().format(record))
    assert line["cycle"] == "{'self': {...}}"
    assert line["message"] == "x"


# --- The access line written out (JsonFormatter's and JsonLinesSink's fast path) --------------

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


def reference_line(record: logging.LogRecord, static: dict[str, Any] | None = None) -> str:
    """The line JsonFormatter's rules describe, written with json.dumps: what it must equal."""
    from asgi_resilience.context import format_timestamp

    payload = {
        "timestamp": format_timestamp(record.created),
        "level": record.levelname,
        "logger": record.name,
        "message": record.getMessage(),
        **(static or {}),
    }
    payload.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
    if record.exc_info:
        payload["exc_info"] = logging.Formatter().formatException(record.exc_info)
    return json.dumps(payload, ensure_ascii=False, default=str)


def access_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": "0c4b7e5d2a1f4e3b9a8c7d6e5f4a3b2c",
        "method": "GET",
        "path": "/items/42",
        "route": "/items/{item_id:int}",
        "status": 200,
        "duration_ms": 1.234,
        "ttfb_ms": 0.5,
        "bytes_sent": 40,
        "client": "127.0.0.1",
        "user_agent": "probe/1.0",
        "http_version": "1.1",
    }
    fields.update(changes)
    return fields


def access_record(fields: dict[str, Any], level: int = logging.INFO) -> logging.LogRecord:
    """A record as AccessLogMiddleware makes it."""
    from asgi_resilience.access_log import _MESSAGE

    status = fields.get("status")
    args = (fields.get("method"), fields.get("path"), status if status is not None else "-", 1.2)
    record = logging.getLogRecordFactory()(LOGGER, level, __file__, 0, _MESSAGE, args, None)
    record.__dict__.update(fields)
    return record


# Fields the middleware writes, odd values included: all taken by the fast path.
WRITTEN_OUT = {
    "plain": access_fields(),
    "nulls": access_fields(
        request_id=None,
        status=None,
        ttfb_ms=None,
        client=None,
        user_agent=None,
        http_version=None,
    ),
    "escapes": access_fields(
        path='/a"b\\c\n\x00\x1f\u2028', user_agent="caf\xe9 \U0001f600 \ud800", route="/\u00e9"
    ),
    "tiny and huge numbers": access_fields(
        duration_ms=1e-07, ttfb_ms=123456789.125, bytes_sent=10**20, status=599
    ),
    "every optional field": access_fields(
        trace_id="0af7651916cd43dd8448eb211c80319c",
        rate_limited="error",
        error="ValueError",
        disconnected=True,
        query="a=1&b=\xe9",
    ),
    "rate limited false": access_fields(rate_limited=False),
}
# What a filter or a caller may leave in the fields: the general path writes these.
GENERAL = {
    "status as text": access_fields(status="200"),
    "status as bool": access_fields(status=True),
    "nan duration": access_fields(duration_ms=float("nan")),
    "infinite ttfb": access_fields(ttfb_ms=float("inf")),
    "int duration": access_fields(duration_ms=2),
    "client as dict": access_fields(client={"ip": "10.0.0.1"}),
    "bytes as float": access_fields(bytes_sent=1.5),
    "str subclass": access_fields(method=type("Verb", (str,), {})("GET")),
    "optional float": access_fields(extra_ms=0.25),
    "optional list": access_fields(tags=["a", 1]),
    "optional object": access_fields(error=ValueError("x")),
}


@pytest.mark.parametrize("fields", list(WRITTEN_OUT.values()), ids=list(WRITTEN_OUT))
@pytest.mark.parametrize("static", [None, {"service": "shop", "n": 1}])
def test_formatter_writes_access_records_out_as_the_encoder_would(
    fields: dict[str, Any], static: dict[str, Any] | None
) -> None:
    from asgi_resilience.access_log import _access_line_of, _StaticFields

    record = access_record(fields)
    assert _access_line_of(record, _StaticFields(static)) is not None  # the fast path is taken
    assert JsonFormatter(static_fields=static).format(record) == reference_line(record, static)


@pytest.mark.parametrize("fields", list(GENERAL.values()), ids=list(GENERAL))
def test_formatter_writes_changed_access_records_the_general_way(fields: dict[str, Any]) -> None:
    record = access_record(fields)
    assert JsonFormatter().format(record) == reference_line(record)


def _rename_client(record: logging.LogRecord) -> None:
    record.peer = record.__dict__.pop("client")


CHANGES = {
    "a field added": lambda record: setattr(record, "span_id", "b7ad6b7169203331"),
    "a field removed": lambda record: delattr(record, "user_agent"),
    "a field moved to the end": lambda record: setattr(
        record, "client", record.__dict__.pop("client")
    ),
    "a field renamed": _rename_client,
    "message formatted by another handler": lambda record: logging.Formatter(
        "%(asctime)s %(message)s"
    ).format(record),
    "exc_info": lambda record: setattr(record, "exc_info", (ValueError, ValueError("x"), None)),
    "level renamed": lambda record: setattr(record, "levelname", "NOTICE"),
    "a non-string key": lambda record: record.__dict__.__setitem__(1, "one"),
}


@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_formatter_follows_what_filters_change_on_access_records(change: Any) -> None:
    record = access_record(access_fields(rate_limited=True))
    change(record)
    assert JsonFormatter().format(record) == reference_line(record)


@pytest.mark.parametrize(
    "static", [{"route": "fixed"}, {"message": "fixed"}, {"level": 1}, {"obj": object()}]
)
def test_formatter_static_fields_that_clash_or_cannot_encode(static: dict[str, Any]) -> None:
    record = access_record(access_fields())
    line = JsonFormatter(static_fields=static).format(record)
    assert line == reference_line(record, static)


def test_formatter_static_values_that_can_change_are_encoded_for_each_line() -> None:
    tags = ["a"]

    class Colour:
        name = "blue"

        def __str__(self) -> str:
            return self.name

    colour = Colour()
    formatter = JsonFormatter(static_fields={"tags": tags, "colour": colour})
    record = access_record(access_fields())
    first = json.loads(formatter.format(record))
    tags.append("b")
    colour.name = "green"
    second = json.loads(formatter.format(record))
    assert (first["tags"], first["colour"]) == (["a"], "blue")
    assert (second["tags"], second["colour"]) == (["a", "b"], "green")  # as for any record
    assert formatter.format(record) == reference_line(record, {"tags": tags, "colour": colour})
    pairs = JsonFormatter(static_fields=[("service", "shop")])  # type: ignore[arg-type]
    assert json.loads(pairs.format(record))["service"] == "shop"


def test_formatter_static_fields_are_read_only_and_replaceable() -> None:
    formatter = JsonFormatter(static_fields={"service": "a"})
    with pytest.raises(TypeError):
        formatter.static_fields["service"] = "b"  # type: ignore[index]
    formatter.static_fields = {"service": "b"}
    assert json.loads(formatter.format(access_record(access_fields())))["service"] == "b"
    with pytest.raises(ValueError, match="static_fields must be a mapping"):
        JsonFormatter(static_fields=["service"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="static_fields must be a mapping"):
        JsonFormatter(static_fields=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [*WRITTEN_OUT.values(), *GENERAL.values(), {"anything": 1}, {}, {"timestamp": "mine"}],
    ids=[*WRITTEN_OUT, *GENERAL, "not an access record", "empty", "a head key"],
)
@pytest.mark.parametrize("static", [None, {"service": "shop"}, {"path": "fixed"}])
def test_sink_lines_are_what_the_encoder_writes(
    fields: dict[str, Any], static: dict[str, Any] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from asgi_resilience import JsonLinesSink
    from asgi_resilience.context import format_timestamp

    monkeypatch.setattr("asgi_resilience.access_log.time", lambda: 1_700_000_000.25)
    stream = io.StringIO()
    sink = JsonLinesSink(stream, static_fields=static)
    sink.emit(logging.WARNING, LOGGER, "GET /x 200 1.2ms", fields)
    sink.flush()
    payload = {
        "timestamp": format_timestamp(1_700_000_000.25),
        "level": "WARNING",
        "logger": LOGGER,
        "message": "GET /x 200 1.2ms",
        **(static or {}),
        **fields,
    }
    assert stream.getvalue() == json.dumps(payload, ensure_ascii=False, default=str) + "\n"


def test_json_formatter_from_a_dict_config_and_an_ini_file(tmp_path: Any) -> None:
    import io
    import logging.config

    def lines_of(logger_name: str, stream: io.StringIO) -> list[dict[str, Any]]:
        logging.getLogger(logger_name).warning("hello %s", "there", extra={"order": 7})
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    stream = io.StringIO()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "json": {"class": "asgi_resilience.JsonFormatter"},
                "tagged": {"()": "asgi_resilience.JsonFormatter", "static_fields": {"svc": "a"}},
            },
            "handlers": {
                "out": {"class": "logging.StreamHandler", "formatter": "json", "stream": stream},
                "tag": {"class": "logging.StreamHandler", "formatter": "tagged", "stream": stream},
            },
            "loggers": {
                "tests.dict": {"handlers": ["out"], "propagate": False},
                "tests.tagged": {"handlers": ["tag"], "propagate": False},
            },
        }
    )
    [line] = lines_of("tests.dict", stream)
    assert (line["message"], line["order"], line["level"]) == ("hello there", 7, "WARNING")
    stream.truncate(0)
    stream.seek(0)
    [tagged] = lines_of("tests.tagged", stream)
    assert tagged["svc"] == "a"

    ini = tmp_path / "logging.ini"
    ini.write_text(
        "[loggers]\nkeys=root,ini\n[handlers]\nkeys=out\n[formatters]\nkeys=json\n"
        "[logger_root]\nhandlers=\n[logger_ini]\nqualname=tests.ini\nhandlers=out\n"
        "propagate=0\n[handler_out]\nclass=StreamHandler\nformatter=json\nargs=(sys.stderr,)\n"
        "[formatter_json]\nclass=asgi_resilience.JsonFormatter\n"
    )
    root_handlers, root_level = logging.getLogger().handlers[:], logging.getLogger().level
    logging.config.fileConfig(ini, disable_existing_loggers=False)
    logging.getLogger().handlers[:] = root_handlers  # the INI's root had none: pytest's back
    logging.getLogger().setLevel(root_level)
    handler = logging.getLogger("tests.ini").handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    stream.truncate(0)
    stream.seek(0)
    [from_ini] = lines_of("tests.ini", stream)
    assert from_ini["message"] == "hello there"
    for name in ("tests.dict", "tests.tagged", "tests.ini"):
        logging.getLogger(name).handlers.clear()
