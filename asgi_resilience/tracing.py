"""OpenTelemetry tracing: one SERVER span per request, named by route template, API only.

Only ``opentelemetry-api`` is needed: without an SDK (no real tracer provider configured) the
middleware does nothing but one provider check per request. With one, each request gets a span
``"GET /items/{item_id}"`` whose parent comes from the incoming W3C ``traceparent``, with the
stable HTTP semantic-convention attributes. Under ``opentelemetry-instrumentation-asgi`` (or
any instrumentation that already opened a SERVER span), that span is enriched instead of a
second one being made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import (
    NoOpTracerProvider,
    ProxyTracerProvider,
    SpanKind,
    Status,
    StatusCode,
)

from ._checks import check_bool, check_instance
from ._http import OTHER_METHOD, first_header, method_label
from .context import (
    PROBE_PATHS,
    UNMATCHED_ROUTE,
    PathSet,
    RequestContext,
    trace_id_of,
)
from .observe import Observer
from .types import ASGIApp, Receive, Scope, Send

__all__ = ["REQUEST_ID_ATTRIBUTE", "TracingMiddleware"]

REQUEST_ID_ATTRIBUTE = "asgi_resilience.request_id"
_PROVIDER_RECHECK = 1.0  # seconds between two looks for a global provider while there is none


class _HeaderGetter(Getter[Scope]):
    """Reads propagation headers (``traceparent``, ``tracestate``, ``baggage``) from a scope."""

    def get(self, carrier: Scope, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier["headers"] if k == name]
        return values or None

    def keys(self, carrier: Scope) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier["headers"]]


_getter = _HeaderGetter()


class TracingMiddleware(Observer):
    """One OpenTelemetry SERVER span per HTTP request.

    Handles ``http`` scopes; others pass through. Reads ``traceparent``/``tracestate`` (through
    the globally configured propagator) for the parent; writes no headers. The span is named
    ``"{method} {route}"`` once routing is known, and carries ``http.request.method``,
    ``url.path``, ``url.scheme``, ``url.query`` (only with ``include_query``), ``client.address``,
    ``server.address``/``server.port``, ``network.protocol.version``,
    ``user_agent.original``, ``http.route``, ``http.response.status_code``,
    ``http.response.body.size`` and the request id (``asgi_resilience.request_id``). Exceptions
    are recorded as events; 5xx responses and exceptions set status ERROR (4xx do not: on a
    server they are the client's error). Place it inside the request id layer (so the id is
    known) and outside metrics and the access log (so their records carry the trace id).

    Args:
        app: the ASGI application.
        tracer_provider: the provider to use; the global one by default. With no SDK
            configured the middleware is a pass-through; a global provider set up later
            (after the first request) is used within a second.
        exclude_paths: paths (and their subpaths) never traced (probes, scrapes).
        include_query: record ``url.query``; off by default, as query strings carry tokens
            and personal data that should not leave for a tracing backend.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        exclude_paths: Iterable[str] = PROBE_PATHS,
        include_query: bool = False,
    ) -> None:
        check_instance("tracer_provider", tracer_provider, trace.TracerProvider, "a TracerProvider")
        check_bool("include_query", include_query)
        self.app = app
        self.tracer_provider = tracer_provider
        self.tracer = trace.get_tracer("asgi_resilience", tracer_provider=tracer_provider)
        self.excluded = PathSet(exclude_paths, option="exclude_paths")
        self.include_query = include_query
        self._sdk = False
        self._next_check = -math.inf

    def _enabled(self) -> bool:
        """Is there an SDK to record spans (asked while ``_sdk`` is false)? Known for good
        once it is: a global provider is set once per process. Until then asked at most every
        ``_PROVIDER_RECHECK`` seconds, as ``get_tracer_provider()`` reads the environment on
        each call (a provider set up after the first request is used from the next check on)."""
        if self.tracer_provider is None:
            now = monotonic()
            if now < self._next_check:
                return False
            self._next_check = now + _PROVIDER_RECHECK
        provider = self.tracer_provider or trace.get_tracer_provider()
        self._sdk = not isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider))
        return self._sdk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (self._sdk or self._enabled()):
            # No SDK: nothing to record. Not even the request context is made here, so the
            # cost is this check (the trace id, if a span exists anyway, is found lazily).
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def enter(self, context: RequestContext, scope: Scope) -> Any:
        if not (self._sdk or self._enabled()):
            return None  # reached through Observers: no SDK, nothing to record
        current = trace.get_current_span()
        if current.is_recording() and getattr(current, "kind", None) is SpanKind.SERVER:
            # An instrumentation's span (opentelemetry-instrumentation-asgi): enrich it instead
            # of nesting a second one. Such instrumentations end their span when the last body
            # message goes out, before the app returns: ours are set just before it.
            _remember_trace_id(context, current)
            if context.request_id:
                current.set_attribute(REQUEST_ID_ATTRIBUTE, context.request_id)
            enrichment = _Enrichment(current, context, scope)
            earlier = context.before_last_body  # another layer's, enriching the same span
            context.before_last_body = (
                enrichment.finish if earlier is None else _both(earlier, enrichment.finish)
            )
            return enrichment
        method = method_label(scope["method"])
        span = self.tracer.start_span(
            method,
            context=propagate.extract(scope, getter=_getter),
            kind=SpanKind.SERVER,
            attributes=_request_attributes(scope, method, context, self.include_query),
            record_exception=False,
            set_status_on_exception=False,
        )
        _remember_trace_id(context, span)
        # What start_as_current_span does, split in two: current from here until exit.
        return span, otel_context.attach(trace.set_span_in_context(span))

    def exit(self, context: RequestContext, scope: Scope, state: Any) -> None:
        if state is None:
            return
        if isinstance(state, _Enrichment):
            state.end()
            return
        span, token = state
        try:
            _finish(span, context, scope)
        finally:
            otel_context.detach(token)
            span.end()


def _both(first: Callable[[int], None], second: Callable[[int], None]) -> Callable[[int], None]:
    def both(pending: int) -> None:
        try:
            second(pending)  # the inner layer's, as its own send wrapper would have run first
        finally:
            first(pending)

    return both


class _Enrichment:
    """An instrumentation's span we add to, finished once: before the last body message, or
    when the request ends without one."""

    __slots__ = ("context", "finished", "scope", "span")

    def __init__(self, span: trace.Span, context: RequestContext, scope: Scope) -> None:
        self.span = span
        self.context = context
        self.scope = scope
        self.finished = False

    def finish(self, pending: int) -> None:
        """``before_last_body``: the response's last message is going out."""
        self._finish(pending, completing=True)

    def end(self) -> None:
        """The request ended: whatever went out went out."""
        self._finish(0, completing=False)

    def _finish(self, pending: int, *, completing: bool) -> None:
        if not self.finished:
            self.finished = True
            _finish(
                self.span,
                self.context,
                self.scope,
                pending=pending,
                completing=completing,
                enriching=True,
            )


def _remember_trace_id(context: RequestContext, span: trace.Span) -> None:
    context.use_trace_id(trace_id_of(span))


def _request_attributes(
    scope: Scope, method: str, context: RequestContext, include_query: bool
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    if method == OTHER_METHOD:
        attributes["http.request.method_original"] = scope["method"]
    query = scope.get("query_string") if include_query else None
    if query:
        attributes["url.query"] = query.decode("latin-1")
    if context.client:
        attributes["client.address"] = context.client
    server = scope.get("server")
    if server:
        attributes["server.address"] = server[0]
        if server[1] is not None:
            attributes["server.port"] = server[1]
    agent = first_header(scope["headers"], b"user-agent")  # as the access log's user_agent
    if agent is not None:
        attributes["user_agent.original"] = agent.decode("latin-1")
    if context.request_id:
        attributes[REQUEST_ID_ATTRIBUTE] = context.request_id
    return attributes


def _finish(
    span: trace.Span,
    context: RequestContext,
    scope: Scope,
    pending: int = 0,
    *,
    completing: bool = False,
    enriching: bool = False,
) -> None:
    """Name the span and add what is known once the response is (about to be) complete.

    ``pending``: body bytes of the final message, not yet counted as sent; ``completing``: that
    message is about to go out (an instrumentation's span ends with it), so the response is
    complete; ``enriching``: the span is an instrumentation's, which records an exception that
    propagates to it (a response cut short) itself: not recorded twice.

    As the HTTP server conventions ask: a 4xx is the client's error, not the span's (a raised
    ``NotFound`` answered 404 leaves the status unset and records no exception); a 5xx, or a
    response cut short by an exception, sets the status to ERROR and ``error.type`` to the
    exception's type or, for a 5xx the application returned, the status code.
    """
    route = context.route(scope)
    method = method_label(scope["method"])
    if route == UNMATCHED_ROUTE:
        span.update_name(method)  # as the HTTP conventions ask when no route matched
    else:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
    if context.request_id:
        span.set_attribute(REQUEST_ID_ATTRIBUTE, context.request_id)
    if context.client_resolved and context.client:
        span.set_attribute("client.address", context.client)  # behind trusted proxies
    status = context.status
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    span.set_attribute("http.response.body.size", context.bytes_sent + pending)
    exception = context.exception
    cut_short = status is None or not (completing or context.complete)
    if exception is not None and (cut_short or (status is not None and status >= 500)):
        if not (enriching and cut_short):
            span.record_exception(exception)
        span.set_attribute("error.type", type(exception).__qualname__)
        span.set_status(Status(StatusCode.ERROR))
    elif status is not None and status >= 500:
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))
