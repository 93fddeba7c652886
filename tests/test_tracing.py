from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.propagators.textmap import (
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_resilience import NotFound, TracingMiddleware, resilient
from asgi_resilience.request_id import RequestIdLogFilter
from asgi_resilience.tracing import REQUEST_ID_ATTRIBUTE
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send
from tests.asgi import Declined, call, client_for, fastapi_app, http_scope, layers, starlette_app

pytestmark = pytest.mark.anyio

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


# -- fixtures and helpers ----------------------------------------------------------------------


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def traced(app: ASGIApp, provider: TracerProvider, **options: Any) -> ASGIApp:
    return resilient(app, registry=CollectorRegistry(), tracer_provider=provider, **options)


# -- one SERVER span per request ---------------------------------------------------------------


@pytest.mark.parametrize("make_app", [starlette_app, fastapi_app], ids=["starlette", "fastapi"])
async def test_one_server_span_per_request_named_by_route(
    make_app: Callable[[], ASGIApp], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with client_for(traced(make_app(), provider)) as client:
        first = await client.get("/items/1?color=red", headers={"User-Agent": "probe/1.0"})
        second = await client.get("/items/2", headers={"X-Request-ID": "order-42"})
    assert first.status_code == second.status_code == 200
    spans = exporter.get_finished_spans()
    assert [span.kind for span in spans] == [SpanKind.SERVER, SpanKind.SERVER]
    assert [span.name for span in spans] == ["GET /items/{item_id}"] * 2
    first_span, second_span = (attributes(span) for span in spans)
    assert first_span["http.request.method"] == "GET"
    assert first_span["http.route"] == "/items/{item_id}"
    assert first_span["http.response.status_code"] == 200
    assert first_span["url.path"] == "/items/1"
    assert "url.query" not in first_span  # query strings carry secrets: off by default
    assert first_span["url.scheme"] == "http"
    assert first_span["client.address"] == "127.0.0.1"
    assert first_span["user_agent.original"] == "probe/1.0"
    assert first_span["http.response.body.size"] == len("item 1")
    assert first_span[REQUEST_ID_ATTRIBUTE] == first.headers["x-request-id"]
    assert second_span[REQUEST_ID_ATTRIBUTE] == second.headers["x-request-id"] == "order-42"
    assert second_span["url.path"] == "/items/2"
    assert "url.query" not in second_span
    assert all(span.parent is None for span in spans)  # no traceparent: new traces
    assert spans[0].context.trace_id != spans[1].context.trace_id


async def test_query_strings_are_recorded_only_when_asked(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = TracingMiddleware(starlette_app(), tracer_provider=provider, include_query=True)
    async with client_for(app) as client:
        await client.get("/items/1?color=red")
    [span] = exporter.get_finished_spans()
    assert attributes(span)["url.query"] == "color=red"


async def test_custom_probe_paths_are_not_traced(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = traced(starlette_app(), provider, health_path="/_health", metrics_path="/_metrics")
    async with client_for(app) as client:
        for path in ("/_health/live", "/_metrics", "/livez", "/items/3"):
            await client.get(path)
    assert [span.name for span in exporter.get_finished_spans()] == ["GET /items/{item_id}"]


async def test_client_address_is_the_client_behind_trusted_proxies(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # Semantic conventions: client.address is the client behind any intermediaries, when known;
    # the stack resolves it once (trusted proxies applied) for the access log and rate limiter.
    app = traced(starlette_app(), provider, trusted_proxies=["127.0.0.1"])
    async with client_for(app) as client:
        await client.get("/items/1", headers={"X-Forwarded-For": "203.0.113.7"})
    [span] = exporter.get_finished_spans()
    assert attributes(span)["client.address"] == "203.0.113.7"


async def test_parent_comes_from_the_traceparent_header(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with client_for(traced(starlette_app(), provider)) as client:
        await client.get("/items/1", headers={"traceparent": TRACEPARENT})
    [span] = exporter.get_finished_spans()
    assert span.parent is not None
    assert span.parent.is_remote
    assert f"{span.parent.span_id:016x}" == PARENT_SPAN_ID
    assert hex_ids(span)[0] == TRACE_ID
    assert hex_ids(span)[1] != PARENT_SPAN_ID


async def test_server_errors_record_the_exception_and_set_error_status(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = traced(starlette_app(), provider)
    assert (await call(app, http_scope("/fail"))).status == 500
    with pytest.raises(Declined, match="stream broke"):
        await call(app, http_scope("/stream"))
    failed, broken = exporter.get_finished_spans()
    assert failed.name == "GET /fail"
    assert failed.status.status_code is StatusCode.ERROR
    assert attributes(failed)["http.response.status_code"] == 500
    assert attributes(failed)["error.type"] == "Declined"
    [event] = [event for event in failed.events if event.name == "exception"]
    event_attributes = dict(event.attributes or {})
    assert str(event_attributes["exception.type"]).endswith("Declined")
    assert event_attributes["exception.message"] == "card declined"
    # After the 200 started: the response was cut short, the span says so.
    assert broken.status.status_code is StatusCode.ERROR
    assert attributes(broken)["http.response.status_code"] == 200
    assert [event.name for event in broken.events] == ["exception"]


async def test_standalone_middleware_records_an_exception_before_any_response(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def jobs(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = "/jobs/{job_id}"  # a framework that names its route templates so
        raise Declined("no such job")

    app = TracingMiddleware(jobs, tracer_provider=provider)
    over_a_socket = http_scope("/jobs/1")
    over_a_socket["server"] = ("/run/app.sock", None)
    without_addresses = http_scope("/jobs/2")
    del without_addresses["server"], without_addresses["client"]
    for scope in (over_a_socket, without_addresses):
        with pytest.raises(Declined):
            await call(app, scope)
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["GET /jobs/{job_id}"] * 2
    socket_span, addressless_span = (attributes(span) for span in spans)
    assert socket_span["server.address"] == "/run/app.sock"
    assert "server.port" not in socket_span
    assert "server.address" not in addressless_span
    assert "client.address" not in addressless_span
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert [event.name for event in span.events] == ["exception"]
        assert attributes(span)["error.type"] == "Declined"
        assert "http.response.status_code" not in attributes(span)  # nothing was sent
        assert REQUEST_ID_ATTRIBUTE not in attributes(span)  # no request id layer


async def test_client_errors_are_not_span_errors(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with client_for(traced(starlette_app(), provider)) as client:
        missing = await client.get("/no/such/item")
        not_allowed = await client.post("/items/1")
    assert (missing.status_code, not_allowed.status_code) == (404, 405)
    spans = exporter.get_finished_spans()
    assert [attributes(span)["http.response.status_code"] for span in spans] == [404, 405]
    assert [span.status.status_code for span in spans] == [StatusCode.UNSET] * 2
    assert [span.events for span in spans] == [(), ()]


@pytest.mark.parametrize("method", ["FOO", "PURGE"])
async def test_unknown_methods_are_named_other(
    method: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with client_for(traced(starlette_app(), provider)) as client:
        assert (await client.request(method, "/items/1")).status_code == 405
    [span] = exporter.get_finished_spans()
    assert span.name == "_OTHER /items/{item_id}"
    assert attributes(span)["http.request.method"] == "_OTHER"
    assert attributes(span)["http.request.method_original"] == method


class TenantPropagator(TextMapPropagator):
    """A propagator of the kind that scans header names (as B3 or Jaeger baggage ones do)."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[str], list[str] | None]] = []

    def extract(
        self,
        carrier: Any,
        context: Context | None = None,
        getter: Getter[Any] = default_getter,
    ) -> Context:
        self.seen.append((list(getter.keys(carrier)), getter.get(carrier, "X-Tenant")))
        return context if context is not None else Context()

    def inject(
        self, carrier: Any, context: Context | None = None, setter: Setter[Any] = default_setter
    ) -> None:
        raise AssertionError("a server span injects nothing into the request")

    @property
    def fields(self) -> set[str]:
        return {"x-tenant"}


async def test_the_configured_propagator_reads_the_request_headers(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    propagator = TenantPropagator()
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(propagator)
    try:
        scope = http_scope("/items/1", headers=[(b"x-tenant", b"acme"), (b"x-tenant", b"beta")])
        await call(traced(starlette_app(), provider), scope)
    finally:
        propagate.set_global_textmap(previous)
    [(keys, tenants)] = propagator.seen
    assert "x-tenant" in keys and "host" in keys
    assert tenants == ["acme", "beta"]
    assert len(exporter.get_finished_spans()) == 1


async def test_probes_and_scrapes_are_not_traced(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    paths = ["/health/live", "/health/ready", "/health", "/livez", "/readyz", "/metrics"]
    async with client_for(traced(starlette_app(), provider)) as client:
        for path in paths:
            assert (await client.get(path)).status_code in (200, 503), path
        assert exporter.get_finished_spans() == ()
        await client.get("/items/1")
    assert len(exporter.get_finished_spans()) == 1


async def test_log_records_carry_the_span_ids(
    provider: TracerProvider, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tests.items")
    caplog.set_level(logging.INFO, logger="asgi_resilience.access")
    log_filter = RequestIdLogFilter()
    caplog.handler.addFilter(log_filter)
    try:
        async with client_for(traced(starlette_app(), provider)) as client:
            response = await client.get("/items/7")
    finally:
        caplog.handler.removeFilter(log_filter)
    [span] = exporter.get_finished_spans()
    trace_id, span_id = hex_ids(span)
    [record] = [r for r in caplog.records if r.name == "tests.items"]
    assert record.getMessage() == "looking up item 7"
    assert getattr(record, "trace_id", None) == trace_id
    assert getattr(record, "span_id", None) == span_id
    assert getattr(record, "request_id", None) == response.headers["x-request-id"]
    # The access log sits inside the span too: its record is correlated the same way.
    [access] = [r for r in caplog.records if r.name == "asgi_resilience.access"]
    assert getattr(access, "trace_id", None) == trace_id


# -- under opentelemetry-instrumentation-asgi -------------------------------------------------


async def test_instrumentation_span_is_enriched_not_duplicated(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = OpenTelemetryMiddleware(traced(starlette_app(), provider), tracer_provider=provider)
    async with client_for(app) as client:
        response = await client.get("/items/1", headers={"X-Request-ID": "order-42"})
    assert response.status_code == 200
    [span] = server_spans(exporter)  # the instrumentation's: ours did not nest a second one
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.asgi"
    assert attributes(span)[REQUEST_ID_ATTRIBUTE] == "order-42"
    assert attributes(span)["http.route"] == "/items/{item_id}"
    assert span.name == "GET /items/{item_id}"


async def missing(request: Request) -> PlainTextResponse:
    raise NotFound("no such order")


async def maintenance(request: Request) -> PlainTextResponse:
    return PlainTextResponse("down for maintenance", status_code=503)


async def failing(request: Request) -> PlainTextResponse:
    raise Declined("card declined")


def outcome_routes() -> list[Route]:
    return [
        Route("/orders/{order_id}", missing),
        Route("/maintenance", maintenance),
        Route("/fail", failing),
    ]


@pytest.mark.parametrize("instrumented", [True, False], ids=["instrumentation", "ours"])
async def test_span_outcomes_follow_the_http_server_conventions(
    instrumented: bool, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = traced(Starlette(routes=outcome_routes()), provider)
    if instrumented:
        app = OpenTelemetryMiddleware(app, tracer_provider=provider)
    async with client_for(app) as client:
        statuses = [
            (await client.get(path)).status_code for path in ("/orders/7", "/maintenance", "/fail")
        ]
    assert statuses == [404, 503, 500]
    not_found, unavailable, failed = server_spans(exporter)
    # a raised NotFound answered 404: the client's error, not the span's
    assert not_found.status.status_code is StatusCode.UNSET
    assert "error.type" not in attributes(not_found)
    assert not_found.events == ()
    # a 503 the application returned: an error, named by its status code
    assert unavailable.status.status_code is StatusCode.ERROR
    assert attributes(unavailable)["error.type"] == "503"
    # an unhandled exception: named by its type, recorded once
    assert failed.status.status_code is StatusCode.ERROR
    assert attributes(failed)["error.type"] == "Declined"
    assert [event.name for event in failed.events] == ["exception"]


async def test_an_exception_after_the_response_started_is_recorded_once_on_any_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    for instrumented in (False, True):
        app = traced(starlette_app(), provider)
        if instrumented:
            app = OpenTelemetryMiddleware(app, tracer_provider=provider)
        with pytest.raises(Declined, match="stream broke"):
            await call(app, http_scope("/stream"))
    ours, theirs = server_spans(exporter)
    for span in (ours, theirs):
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span)["error.type"] == "Declined"
        assert [event.name for event in span.events] == ["exception"]


# -- without an SDK ----------------------------------------------------------------------------


async def test_without_an_sdk_tracing_is_a_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # The API's default: nothing configured a global provider (no test does).
    assert isinstance(trace.get_tracer_provider(), ProxyTracerProvider)
    seen: list[trace.Span] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        seen.append(trace.get_current_span())
        return PlainTextResponse("ok")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tracer must not be called without an SDK")

    inner = Starlette(routes=[Route("/items/{item_id}", endpoint)])
    app = resilient(inner, registry=CollectorRegistry())
    middleware = find_layer(app, TracingMiddleware)
    monkeypatch.setattr(middleware.tracer, "start_as_current_span", never)
    noop = TracingMiddleware(inner, tracer_provider=NoOpTracerProvider())
    monkeypatch.setattr(noop.tracer, "start_as_current_span", never)
    async with client_for(app) as client:
        response = await client.get("/items/1", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200
    assert (await call(noop, http_scope("/items/2"))).status == 200
    assert [span.get_span_context().is_valid for span in seen] == [False, False]
    assert not any(span.is_recording() for span in seen)


async def test_a_global_provider_set_later_is_used_from_the_next_check(
    provider: TracerProvider, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The global provider can be set once per process: the API's getter stands in for it.
    import asgi_resilience.tracing as tracing_module

    clock = [100.0]
    monkeypatch.setattr(tracing_module, "monotonic", lambda: clock[0])
    looks: list[int] = []

    def proxy_provider() -> trace.TracerProvider:
        looks.append(1)
        return ProxyTracerProvider()

    monkeypatch.setattr(trace, "get_tracer_provider", proxy_provider)
    app = TracingMiddleware(starlette_app(), tracer_provider=None)
    looks.clear()  # the tracer was asked for at construction
    for _ in range(3):
        assert (await call(app, http_scope("/items/1"))).status == 200
    assert len(looks) == 1  # no provider: asked once, not once per request
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    app.tracer = provider.get_tracer("asgi_resilience")  # what the global proxy would hand out
    await call(app, http_scope("/items/2"))
    assert server_spans(exporter) == []  # until the next check
    clock[0] += 1.0
    await call(app, http_scope("/items/3"))
    await call(app, http_scope("/items/4"))
    assert [span.attributes and span.attributes["url.path"] for span in server_spans(exporter)] == [
        "/items/3",
        "/items/4",
    ]


def find_layer(app: ASGIApp, kind: type[TracingMiddleware]) -> TracingMiddleware:
    return next(layer for layer in layers(app) if isinstance(layer, kind))


async def test_other_scopes_pass_through(provider: TracerProvider) -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing should be sent, got {message}")

    app = TracingMiddleware(inner, tracer_provider=provider)
    for scope_type in ("websocket", "lifespan"):
        await app({"type": scope_type, "path": "/"}, receive, send)
    assert seen == ["websocket", "lifespan"]
