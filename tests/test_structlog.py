"""``asgi_resilience.structlog.add_request_context``: structlog's own events carry the request id
and the trace, under many concurrent requests, each its own."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import anyio
import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from structlog.testing import LogCapture

from asgi_resilience import resilient
from asgi_resilience.structlog import add_request_context
from tests.asgi import call, http_scope

pytestmark = pytest.mark.anyio


def captured_logger() -> tuple[Any, LogCapture]:
    capture = LogCapture()
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[add_request_context, capture]
    )
    return logger, capture


async def test_each_concurrent_requests_events_carry_its_own_ids(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    logger, capture = captured_logger()

    async def order(request: Request) -> PlainTextResponse:
        number = request.path_params["n"]
        logger.info("order received", order=number)
        await anyio.lowlevel.checkpoint()  # the other requests run in between
        logger.bind(step="paid").info("order paid", order=number)
        return PlainTextResponse("ok")

    app = resilient(
        Starlette(routes=[Route("/orders/{n}", order)]),
        environ={},
        access_log=False,
        registry=CollectorRegistry(),
        tracer_provider=provider,
    )
    request_ids: dict[str, str] = {}

    async def one(n: int) -> None:
        response = await call(app, http_scope(f"/orders/{n}"))
        request_ids[str(n)] = response.headers["x-request-id"]

    async with anyio.create_task_group() as group:
        for n in range(300):
            group.start_soon(one, n)
    assert len(capture.entries) == 600
    spans = {
        format(span.context.trace_id, "032x"): format(span.context.span_id, "016x")
        for span in exporter.get_finished_spans()
    }
    for entry in capture.entries:
        assert entry["request_id"] == request_ids[entry["order"]]
        assert spans[entry["trace_id"]] == entry["span_id"]  # the request's own SERVER span
    assert len({entry["request_id"] for entry in capture.entries}) == 300


def test_outside_a_request_and_a_span_nothing_is_added() -> None:
    logger, capture = captured_logger()
    logger.info("started")
    assert capture.entries == [{"event": "started", "log_level": "info"}]


async def test_values_the_event_already_has_are_left_alone() -> None:
    logger, capture = captured_logger()

    async def endpoint(request: Request) -> PlainTextResponse:
        logger.info("bound", request_id="from-the-caller", trace_id="mine")
        return PlainTextResponse("ok")

    app = resilient(Starlette(routes=[Route("/", endpoint)]), environ={}, access_log=False)
    await call(app, http_scope("/"))
    [entry] = capture.entries
    assert entry["request_id"] == "from-the-caller" and entry["trace_id"] == "mine"
    assert "span_id" not in entry


def test_the_module_imports_and_works_without_structlog_installed() -> None:
    script = (
        "import sys; sys.modules['structlog'] = None\n"
        "from asgi_resilience.structlog import add_request_context\n"
        "print(add_request_context(None, 'info', {'event': 'x'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'event': 'x'}"


def test_a_json_renderer_writes_the_ids(capsys: pytest.CaptureFixture[str]) -> None:
    from asgi_resilience.context import RequestContext, _current

    context = RequestContext(http_scope())
    context.request_id = "req-1"
    token = _current.set(context)
    try:
        logger = structlog.wrap_logger(
            structlog.PrintLogger(),
            processors=[add_request_context, structlog.processors.JSONRenderer()],
        )
        logger.info("hello")
    finally:
        _current.reset(token)
    assert json.loads(capsys.readouterr().out) == {"event": "hello", "request_id": "req-1"}
