"""``on_error``: each unhandled exception handed once to an error reporter, with its context."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from asgi_resilience import (
    CircuitOpenError,
    ConfigurationError,
    ErrorMiddleware,
    NotFound,
    RequestContext,
    RequestIdMiddleware,
    resilient,
)
from asgi_resilience.integrations import report_exception
from asgi_resilience.types import Message, Receive, Scope, Send
from tests.asgi import call, client_for, http_scope, wait_until

pytestmark = pytest.mark.anyio


class Reports:
    """An error reporter that remembers what it was given, and what the client had by then."""

    def __init__(self, sent: list[Message] | None = None) -> None:
        self.calls: list[tuple[Exception, RequestContext]] = []
        self.sent_before: list[int] = []
        self.sent = sent

    def __call__(self, exc: Exception, context: RequestContext) -> None:
        self.calls.append((exc, context))
        if self.sent is not None:
            self.sent_before.append(len(self.sent))


async def boom(request: Request) -> PlainTextResponse:
    raise RuntimeError(f"boom {request.path_params['n']}")


async def missing(request: Request) -> PlainTextResponse:
    raise NotFound("no such thing")


async def forbidden(request: Request) -> PlainTextResponse:
    raise HTTPException(403)


async def open_circuit(request: Request) -> PlainTextResponse:
    raise CircuitOpenError("payments", retry_after=3)


async def broken_stream(request: Request) -> StreamingResponse:
    async def chunks() -> Any:
        yield b"first"
        raise RuntimeError("stream broke")

    return StreamingResponse(chunks())


def routes() -> list[Route]:
    return [
        Route("/boom/{n}", boom),
        Route("/missing", missing),
        Route("/forbidden", forbidden),
        Route("/circuit", open_circuit),
        Route("/stream", broken_stream),
    ]


async def test_on_error_gets_the_exception_and_the_context_with_the_request_id() -> None:
    reports = Reports()
    app = resilient(Starlette(routes=routes()), on_error=reports, environ={})
    async with client_for(app) as client:
        response = await client.get("/boom/1")
    assert response.status_code == 500
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert "boom 1" not in response.text  # production: the reporter hears it, the client does not
    [(exc, context)] = reports.calls
    assert isinstance(exc, RuntimeError) and str(exc) == "boom 1"
    assert context.request_id == response.headers["x-request-id"]
    assert context.status == 500


async def test_on_error_runs_after_the_whole_500_went_out() -> None:
    sent: list[Message] = []
    reports = Reports(sent)

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    app = ErrorMiddleware(Starlette(routes=routes()), on_error=reports)
    await app(http_scope("/boom/2"), receive, send)
    assert reports.sent_before == [2]  # start and body were sent before the reporter ran
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")


async def test_an_async_on_error_is_awaited() -> None:
    seen: list[str | None] = []

    async def report(exc: Exception, context: RequestContext) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(context.request_id)

    app = RequestIdMiddleware(ErrorMiddleware(Starlette(routes=routes()), on_error=report))
    response = await call(app, http_scope("/boom/3"))
    assert response.status == 500
    assert seen == [response.headers["x-request-id"]]


@pytest.mark.parametrize("path", ["/missing", "/forbidden", "/circuit", "/nowhere"])
async def test_answers_the_client_caused_are_not_reported(path: str) -> None:
    reports = Reports()
    app = ErrorMiddleware(Starlette(routes=routes()), on_error=reports)
    response = await call(app, http_scope(path))
    assert response.status in (403, 404, 503)
    assert reports.calls == []


async def test_an_exception_after_the_response_started_is_reported_once() -> None:
    reports = Reports()
    app = ErrorMiddleware(Starlette(routes=routes()), on_error=reports)
    with pytest.raises(RuntimeError, match="stream broke"):
        await call(app, http_scope("/stream"))
    await wait_until(lambda: bool(reports.calls))  # reported beside the request, not in it
    for _ in range(10):
        await anyio.lowlevel.checkpoint()
    [(exc, _)] = reports.calls
    assert str(exc) == "stream broke"


async def test_an_exception_the_framework_rendered_and_reported_is_reported_once() -> None:
    reports = Reports()
    failure = ValueError("rendered by the framework")

    async def framework(scope: Scope, receive: Receive, send: Send) -> None:
        report_exception(failure, scope)
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"oops"})

    response = await call(ErrorMiddleware(framework, on_error=reports), http_scope())
    assert response.status == 500
    assert [exc for exc, _ in reports.calls] == [failure]


async def test_an_on_error_that_raises_is_logged_and_the_client_gets_the_normal_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_reporter(exc: Exception, context: RequestContext) -> None:
        raise ConnectionError("reporter is down")

    app = resilient(Starlette(routes=routes()), on_error=broken_reporter, environ={})
    with caplog.at_level(logging.ERROR, logger="asgi_resilience.errors"):
        async with client_for(app) as client:
            response = await client.get("/boom/4")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Internal Server Error"
    failed = [r for r in caplog.records if "on_error" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].exc_info is not None and isinstance(failed[0].exc_info[1], ConnectionError)
    assert getattr(failed[0], "request_id", None) == response.headers["x-request-id"]
    # the request's own exception is still logged once, with its traceback
    unhandled = [r for r in caplog.records if r.getMessage().startswith("Unhandled RuntimeError")]
    assert len(unhandled) == 1


async def test_under_a_thousand_concurrent_failures_each_is_reported_once_with_its_own_id() -> None:
    reports = Reports()
    app = resilient(Starlette(routes=routes()), on_error=reports, environ={}, access_log=False)
    bodies: list[dict[str, Any]] = []

    async def one(n: int) -> None:
        response = await call(app, http_scope(f"/boom/{n}"))
        assert response.status == 500
        bodies.append(json.loads(response.body))

    async with anyio.create_task_group() as group:
        for n in range(1000):
            group.start_soon(one, n)
    assert len(reports.calls) == 1000
    pairs = {(str(exc), context.request_id) for exc, context in reports.calls}
    assert len(pairs) == 1000
    by_id = {body["request_id"] for body in bodies}
    assert {request_id for _, request_id in pairs} == by_id
    assert {str(exc) for exc, _ in reports.calls} == {f"boom {n}" for n in range(1000)}


def test_on_error_must_be_callable() -> None:
    with pytest.raises(ValueError, match="on_error must be a callable"):
        ErrorMiddleware(Starlette(), on_error="sentry")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_error must be a callable"):
        resilient(Starlette(), on_error=42, environ={})  # type: ignore[arg-type]


def test_on_error_without_the_error_layer_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="on_error does nothing with errors=False"):
        resilient(Starlette(), errors=False, on_error=Reports(), environ={})


SENTRY_SCRIPT = """
import sentry_sdk
from sentry_sdk.integrations.fastapi import FastApiIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.integrations.starlette import StarletteIntegration
from sentry_sdk.transport import Transport
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from asgi_resilience import resilient

events = []


class Capture(Transport):
    def capture_envelope(self, envelope):
        events.extend(item.payload.json for item in envelope.items if item.type == "event")


sentry_sdk.init(
    dsn="https://key@sentry.invalid/1",
    transport=Capture,
    integrations=[LoggingIntegration(event_level=None)],
    disabled_integrations=[StarletteIntegration(), FastApiIntegration()],
)


def report(exc, context):
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("request_id", context.request_id)
        scope.capture_exception(exc)


async def boom(request):
    raise RuntimeError("boom")


app = resilient(Starlette(routes=[Route("/boom", boom)]), on_error=report, environ={})
with TestClient(app) as client:
    response = client.get("/boom")
assert response.status_code == 500, response.status_code
[event] = events
assert event["tags"] == {"request_id": response.headers["x-request-id"]}, event["tags"]
[exception] = event["exception"]["values"]
assert (exception["type"], exception["value"]) == ("RuntimeError", "boom"), exception
print("one event")
"""


def test_the_readmes_sentry_recipe_sends_one_event_with_the_request_id() -> None:
    # A process of its own: Sentry's integrations patch libraries process-wide.
    done = subprocess.run(
        [sys.executable, "-c", SENTRY_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "one event"


async def test_a_half_sent_response_is_not_held_open_while_the_reporter_runs() -> None:
    release = anyio.Event()
    reported: list[str] = []

    async def slow_reporter(exc: Exception, context: RequestContext) -> None:
        await release.wait()
        reported.append(str(exc))

    app = ErrorMiddleware(Starlette(routes=routes()), on_error=slow_reporter)
    with anyio.fail_after(5), pytest.raises(RuntimeError, match="stream broke"):
        await call(app, http_scope("/stream"))  # raised at once: the server closes now
    assert reported == []
    release.set()
    await wait_until(lambda: reported == ["stream broke"])


async def test_a_client_that_left_during_the_upload_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reports = Reports()

    async def upload(request: Request) -> PlainTextResponse:
        await request.body()
        return PlainTextResponse("stored")

    async def gone() -> Message:
        return {"type": "http.disconnect"}

    app = resilient(
        Starlette(routes=[Route("/upload", upload, methods=["POST"])]),
        on_error=reports,
        environ={},
        registry=CollectorRegistry(),
    )
    with caplog.at_level(logging.INFO):
        response = await call(app, http_scope("/upload", method="POST"), receive=gone)
    assert response.messages == []  # nobody to answer: no 500 invented
    assert reports.calls == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    [access] = [r for r in caplog.records if r.name == "asgi_resilience.access"]
    assert getattr(access, "disconnected", None) is True
    assert getattr(access, "status", "missing") is None


async def test_an_inner_error_layer_without_a_hook_does_not_hide_the_exception() -> None:
    reports = Reports()
    inner = ErrorMiddleware(Starlette(routes=routes()))  # logs it, has no hook
    outer = resilient(inner, on_error=reports, environ={}, registry=CollectorRegistry())
    response = await call(outer, http_scope("/boom/9"))
    assert response.status == 500
    assert [str(exc) for exc, _ in reports.calls] == ["boom 9"]


async def test_two_error_layers_with_hooks_report_it_once() -> None:
    inner_reports, outer_reports = Reports(), Reports()
    inner = ErrorMiddleware(Starlette(routes=routes()), on_error=inner_reports)
    outer = ErrorMiddleware(inner, on_error=outer_reports)
    with pytest.raises(RuntimeError):
        await call(outer, http_scope("/stream"))
    await wait_until(lambda: len(inner_reports.calls) + len(outer_reports.calls) >= 1)
    for _ in range(10):
        await anyio.lowlevel.checkpoint()
    assert len(inner_reports.calls) + len(outer_reports.calls) == 1
