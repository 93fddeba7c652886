"""``Observers``: request ids, tracing, metrics and the access log in one pass.

The one-pass driver must be indistinguishable from nesting the same middlewares: the same
messages, records, metrics and spans for an app that answers, streams, raises at each point or
is cancelled. And the paths only the driver has: a concern switched off, different excluded
paths per concern, an observer that answers itself, an exit that raises, two stacks nested.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from asgi_resilience import (
    AccessLogMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
    TracingMiddleware,
    resilient,
)
from asgi_resilience.observe import REPLY, Observer, Observers
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send
from tests.asgi import call, http_scope, layers

pytestmark = pytest.mark.anyio

ACCESS = "tests.observe.access"


class Failure(Exception):
    pass


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]})
    await send({"type": "http.response.body", "body": b"abc", "more_body": True})
    await send({"type": "http.response.body", "body": b"de"})


async def raise_before_start(scope: Scope, receive: Receive, send: Send) -> None:
    raise Failure("before")


async def raise_mid_stream(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"part", "more_body": True})
    raise Failure("mid-stream")


async def raise_after_complete(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"done"})
    raise Failure("after")


async def cancelled(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    raise anyio.get_cancelled_exc_class()


async def pathsend(scope: Scope, receive: Receive, send: Send) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"7")]}
    )
    await send({"type": "http.response.pathsend", "path": "/dev/null"})


APPS: dict[str, ASGIApp] = {
    "ok": ok,
    "raise before start": raise_before_start,
    "raise mid-stream": raise_mid_stream,
    "raise after complete": raise_after_complete,
    "cancelled": cancelled,
    "pathsend": pathsend,
}


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def access_logger() -> tuple[logging.Logger, Records]:
    logger = logging.Logger(ACCESS)
    handler = Records()
    logger.addHandler(handler)
    return logger, handler


def build(
    app: ASGIApp, provider: TracerProvider, *, fused: bool
) -> tuple[ASGIApp, CollectorRegistry, Records]:
    registry = CollectorRegistry()
    logger, records = access_logger()
    observers: list[Observer] = [
        RequestIdMiddleware(app, generator=lambda: "fixed-id"),
        TracingMiddleware(app, tracer_provider=provider),
        MetricsMiddleware(app, registry=registry),
        AccessLogMiddleware(app, logger=logger),
    ]
    if fused:
        return Observers(app, observers), registry, records
    stack: ASGIApp = app
    stack = AccessLogMiddleware(stack, logger=logger)
    stack = MetricsMiddleware(stack, registry=registry)
    stack = TracingMiddleware(stack, tracer_provider=provider)
    stack = RequestIdMiddleware(stack, generator=lambda: "fixed-id")
    return stack, registry, records


async def observed(
    app: ASGIApp, provider: TracerProvider, exporter: InMemorySpanExporter, *, fused: bool
) -> dict[str, Any]:
    """Everything the four concerns make of one request: to compare one pass with nesting."""
    stack, registry, records = build(app, provider, fused=fused)
    exporter.clear()
    raised: str | None = None
    try:
        response = await call(stack, http_scope("/things"))
        messages = response.messages
    except BaseException as exc:
        raised, messages = type(exc).__name__, []
    skip = {"duration_ms", "ttfb_ms", "created", "msecs", "relativeCreated", "thread"}
    skip |= {"threadName", "process", "processName", "taskName", "trace_id", "args"}
    samples = sorted(
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith(("_sum", "_created")) or "bytes" in sample.name
        if "seconds_bucket" not in sample.name
    )
    (span,) = exporter.get_finished_spans()
    return {
        "raised": raised,
        "messages": messages,
        "records": [
            ({k: v for k, v in vars(r).items() if k not in skip}, r.levelno)
            for r in records.records
        ],
        "samples": samples,
        "span": (
            span.name,
            span.status.status_code,
            dict(span.attributes or {}),
            [event.name for event in span.events],
        ),
    }


@pytest.mark.parametrize("app", list(APPS.values()), ids=list(APPS))
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_one_pass_is_what_nesting_the_same_middlewares_gives(
    app: ASGIApp, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    nested = await observed(app, provider, exporter, fused=False)
    fused = await observed(app, provider, exporter, fused=True)
    assert fused == nested
    # And what both give is the behaviour each concern documents, not a shared mistake.
    (record, level) = fused["records"][0]
    assert record["request_id"] == "fixed-id"
    assert fused["span"][2]["asgi_resilience.request_id"] == "fixed-id"
    if app is raise_before_start:
        assert fused["raised"] == "Failure" and record["status"] == 500 and level == logging.ERROR
    if app is cancelled:
        assert record["disconnected"] is True and fused["raised"] is not None
    if app is pathsend:
        assert record["bytes_sent"] == 7


class Noting(Observer):
    """An observer writing down when its steps run (and raising, if told to)."""

    def __init__(
        self, app: ASGIApp, name: str, log: list[str], *, fail: bool = False, **kwargs: Any
    ) -> None:
        self.app = app
        self.name = name
        self.log = log
        self.fail = fail
        self.excluded = kwargs.get("excluded")

    def enter(self, context: Any, scope: Scope) -> Any:
        self.log.append(f"enter {self.name}")
        return self.name

    def exit(self, context: Any, scope: Scope, state: Any) -> None:
        self.log.append(f"exit {self.name} {state} {context.status}")
        if self.fail:
            raise Failure(self.name)


async def test_steps_run_in_nesting_order_and_every_exit_runs_when_one_raises() -> None:
    log: list[str] = []
    stack = Observers(
        ok,
        [Noting(ok, "a", log), Noting(ok, "b", log, fail=True), Noting(ok, "c", log, fail=True)],
    )
    with pytest.raises(Failure, match="c"):  # the first exit to fail: the innermost
        await call(stack)
    assert log == ["enter a", "enter b", "enter c", "exit c c 201", "exit b b 201", "exit a a 201"]


async def test_each_concern_skips_its_own_excluded_paths_in_one_pass() -> None:
    from asgi_resilience.context import PathSet

    log: list[str] = []
    stack = Observers(
        ok,
        [
            Noting(ok, "ids", log),
            Noting(ok, "metrics", log, excluded=PathSet(["/metrics"])),
            Noting(ok, "access", log, excluded=PathSet(["/health"])),
            Noting(ok, "also-health", log, excluded=PathSet(["/health/"])),  # the same paths
        ],
    )
    for path in ("/things", "/health/ready", "/metrics", "/healthz"):
        log.clear()
        await call(stack, http_scope(path))
        entered = [line.split()[1] for line in log if line.startswith("enter")]
        expected = {
            "/things": ["ids", "metrics", "access", "also-health"],
            "/health/ready": ["ids", "metrics"],
            "/metrics": ["ids", "access", "also-health"],
            "/healthz": ["ids", "metrics", "access", "also-health"],
        }[path]
        assert entered == expected, path
    all_excluded = Observers(ok, [Noting(ok, "m", log, excluded=PathSet(["/metrics"]))])
    log.clear()
    response = await call(all_excluded, http_scope("/metrics"))
    assert response.status == 201 and log == []  # nothing entered, the app still answered


async def test_an_observer_answering_itself_is_still_measured_and_logged() -> None:
    registry = CollectorRegistry()
    logger, records = access_logger()
    # resilient() has no on_invalid option: the observers it would build, ids rejecting.
    observers = [
        RequestIdMiddleware(ok, on_invalid="reject"),
        MetricsMiddleware(ok, registry=registry),
        AccessLogMiddleware(ok, logger=logger),
    ]
    rejecting = Observers(ok, observers)
    response = await call(rejecting, http_scope(headers=[(b"x-request-id", b"bad id")]))
    assert response.status == 400 and response.headers["x-request-id"] != "bad id"
    (record,) = records.records
    assert record.status == 400 and record.request_id == response.headers["x-request-id"]  # type: ignore[attr-defined]
    count = registry.get_sample_value(
        "http_server_request_duration_seconds_count",
        {"method": "GET", "route": "<unmatched>", "status_code": "400"},
    )
    assert count == 1


async def test_a_concern_switched_off_leaves_the_others_in_one_pass() -> None:
    def kinds(app: ASGIApp) -> list[str]:
        return [type(layer).__name__ for layer in layers(app)]

    observing = ["RequestIdMiddleware", "TracingMiddleware", "MetricsMiddleware"]
    for switched_off in ("request_ids", "tracing", "metrics", "access_log"):
        off: dict[str, Any] = {switched_off: False}
        app = resilient(ok, environ={}, registry=CollectorRegistry(), **off)
        found = [k for k in kinds(app) if k in [*observing, "AccessLogMiddleware"]]
        assert len(found) == 3 and all(switched_off.split("_")[0] not in k.lower() for k in found)
        response = await call(app, http_scope("/things"))
        assert response.status == 201 and response.body == b"abcde"
    only_ids = resilient(
        ok, environ={}, tracing=False, metrics=False, access_log=False, metrics_path=None
    )
    assert not any(isinstance(layer, Observers) for layer in [only_ids.stack.app])  # type: ignore[attr-defined]
    assert isinstance(only_ids.stack.app, RequestIdMiddleware)  # type: ignore[attr-defined]
    assert "x-request-id" in (await call(only_ids)).headers


async def test_two_stacks_nested_share_one_request_id_and_record_once(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    inner_logger, inner_records = access_logger()
    outer_logger, outer_records = access_logger()
    registry = CollectorRegistry()
    inner = Observers(
        ok,
        [
            RequestIdMiddleware(ok),
            TracingMiddleware(ok, tracer_provider=provider),
            AccessLogMiddleware(ok, logger=inner_logger),
        ],
    )
    outer = resilient(
        inner,
        environ={},
        registry=registry,
        access_logger=outer_logger,
        tracer_provider=provider,
    )
    response = await call(outer, http_scope("/things"))
    request_id = response.headers["x-request-id"]
    assert response.header_list("x-request-id") == [request_id]  # one id header, not two
    assert [r.request_id for r in outer_records.records] == [request_id]  # type: ignore[attr-defined]
    assert [r.request_id for r in inner_records.records] == [request_id]  # type: ignore[attr-defined]
    assert outer_records.records[0].bytes_sent == 5  # type: ignore[attr-defined]
    # The inner tracing finds the outer SERVER span and adds to it: one span, not two.
    (span,) = exporter.get_finished_spans()
    assert span.kind is SpanKind.SERVER and span.name == "GET"
    assert dict(span.attributes or {})["asgi_resilience.request_id"] == request_id


async def test_an_instrumentation_between_the_recording_layer_and_tracing_is_enriched(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # RequestIdMiddleware records outside the instrumentation, which ends its span on the last
    # body message: tracing inside must still add its attributes before that.
    tracing = TracingMiddleware(ok, tracer_provider=provider)
    stack = RequestIdMiddleware(OpenTelemetryMiddleware(tracing, tracer_provider=provider))
    response = await call(stack, http_scope("/things"))
    (span,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    attributes = dict(span.attributes or {})
    assert attributes["asgi_resilience.request_id"] == response.headers["x-request-id"]
    assert attributes["http.response.body.size"] == 5


def test_observers_refuses_what_cannot_run() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Observers(ok, [])
    with pytest.raises(ValueError, match="Observer instances"):
        Observers(ok, [ok])  # type: ignore[list-item]
    assert repr(REPLY) == "REPLY"


async def test_other_scopes_pass_through_untouched() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        assert "asgi_resilience.context" not in scope

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    log: list[str] = []
    stack = Observers(app, [Noting(app, "a", log)])
    await stack({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    await stack({"type": "lifespan"}, receive, send)
    assert seen == ["websocket", "lifespan"] and log == []


async def test_two_tracing_layers_enriching_one_span_both_finish_before_it_ends(
    provider: TracerProvider, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    inner = TracingMiddleware(ok, tracer_provider=provider)
    outer = TracingMiddleware(RequestIdMiddleware(inner), tracer_provider=provider)
    stack = OpenTelemetryMiddleware(outer, tracer_provider=provider)
    with caplog.at_level(logging.WARNING):
        response = await call(stack, http_scope("/things"))
    (span,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    attributes = dict(span.attributes or {})
    assert attributes["http.response.body.size"] == 5
    assert attributes["asgi_resilience.request_id"] == response.headers["x-request-id"]
    assert not [r for r in caplog.records if "ended span" in r.getMessage()]


class Raising(Observer):
    def __init__(self, app: ASGIApp, log: list[str]) -> None:
        self.app = app
        self.log = log

    def enter(self, context: Any, scope: Scope) -> Any:
        self.log.append("enter raising")
        raise Failure("enter")

    def exit(self, context: Any, scope: Scope, state: Any) -> None:
        self.log.append("exit raising")  # never: it did not come in


class ExitOnly(Observer):
    def __init__(self, app: ASGIApp, name: str, log: list[str]) -> None:
        self.app = app
        self.name = name
        self.log = log

    def exit(self, context: Any, scope: Scope, state: Any) -> None:
        self.log.append(f"exit {self.name} {type(context.exception).__name__}")


async def test_an_enter_that_raises_propagates_and_only_the_observers_reached_exit() -> None:
    log: list[str] = []
    stack = Observers(
        ok,
        [
            Noting(ok, "a", log),
            ExitOnly(ok, "b", log),
            Raising(ok, log),
            ExitOnly(ok, "c", log),
            Noting(ok, "d", log),
        ],
    )
    with pytest.raises(Failure, match="enter"):  # its own exception, not an IndexError
        await call(stack)
    assert log == ["enter a", "enter raising", "exit b Failure", "exit a a None"]


async def test_a_rejected_request_id_is_traced_too(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    observers = [
        RequestIdMiddleware(ok, on_invalid="reject"),
        TracingMiddleware(ok, tracer_provider=provider),
    ]
    response = await call(Observers(ok, observers), http_scope(headers=[(b"x-request-id", b"")]))
    assert response.status == 400
    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["http.response.status_code"] == 400
    assert attributes["asgi_resilience.request_id"] == response.headers["x-request-id"]
