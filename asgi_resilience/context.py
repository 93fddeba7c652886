"""The per-request context every layer of the stack shares.

The first of our middlewares to see an HTTP request creates one ``RequestContext`` and stores it
in the scope under ``CONTEXT_KEY`` (and in a context variable for code running inside the
request). Later layers read and fill the same object, so the request id, the client address, the
route template and the response facts (status, bytes, timings) are each worked out once, however
many of our middlewares are stacked.

Response facts are recorded by one ``send`` wrapper, installed by the outermost observing layer
(``RequestContext.record``); inner layers find the context already recording and add nothing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any, Literal

from opentelemetry import trace

from ._routes import UNMATCHED_ROUTE as UNMATCHED_ROUTE
from ._routes import route_template as route_template
from ._timestamps import format_timestamp as format_timestamp
from ._timestamps import utc_timestamp as utc_timestamp
from .types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CONTEXT_KEY",
    "PROBE_PATHS",
    "UNMATCHED_ROUTE",
    "ContextMiddleware",
    "PathSet",
    "RequestContext",
    "format_timestamp",
    "get_deadline",
    "path_matcher",
    "remaining_time",
    "route_path",
    "route_template",
    "trace_id_of",
    "utc_timestamp",
]

CONTEXT_KEY = "asgi_resilience.context"
# Probes and scrapes: what the access log and tracing leave out unless told otherwise.
PROBE_PATHS = ("/health", "/livez", "/readyz", "/metrics")

ErrorFormat = Literal["problem", "envelope"]

_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "asgi_resilience_request_context", default=None
)


class RequestContext:
    """What the stack knows about one HTTP request, shared by all our layers.

    Attributes:
        start: ``time.perf_counter()`` when the first layer saw the request.
        request_id: set by ``RequestIdMiddleware``; ``None`` without it.
        client: the client address: the peer (``scope["client"]`` host) until a layer with
            trusted proxies resolved it (``client_resolved``) from forwarding headers.
        status: the status of the response sent, ``None`` until it starts.
        response_started / response_ended: ``perf_counter()`` at the start message and at the
            last body byte (or the ``pathsend``); ``None`` until then.
        bytes_sent: body bytes actually handed to the server.
        exception: the exception the application raised, if any.
        exception_logged: the exception whose traceback was logged (so it is logged once).
        exception_reported: the exception handed to an ``on_error`` hook (so once, whichever
            error layer has the hook).
        disconnected: sending failed because the client went away.
        error_format: the error body shape chosen by ``ErrorMiddleware`` for inner layers.
        error_rendered: the response in flight was rendered by us (the error renderer, a health
            endpoint): ``ErrorMiddleware`` leaves it alone.
        envelope_meta: extra ``meta`` members handlers added for the envelope.
        envelope_skip: the handler opted this response out of the envelope.
        traced / trace_id: ``TracingMiddleware`` looked up the request's span once; inner
            layers take the trace id (``None``: no valid span) from here.
        before_last_body: called once, with the body bytes of the last message, just before
            that message (or the ``pathsend``) goes out (tracing enriching a span that the
            instrumentation outside ends then).
        response_headers: headers our layers add to the response (request id, rate limits),
            written by the recording ``send`` (``record``) on whatever response goes out.
        replaced_headers: header names (lowercase) whose values the application set are
            dropped from the response, as ``response_headers`` carries ours.
    """

    __slots__ = (
        "_route",
        "_start_headers",
        "before_last_body",
        "bytes_sent",
        "client",
        "client_resolved",
        "debug",
        "disconnected",
        "envelope_meta",
        "envelope_skip",
        "error_format",
        "error_rendered",
        "exception",
        "exception_logged",
        "exception_reported",
        "rate_limited",
        "recording",
        "replaced_headers",
        "reported_exception",
        "request_id",
        "response_ended",
        "response_headers",
        "response_started",
        "start",
        "status",
        "trace_id",
        "traced",
    )

    def __init__(self, scope: Scope) -> None:
        self.start = perf_counter()
        self.request_id: str | None = None
        client = scope.get("client")
        self.client: str | None = client[0] if client else None
        self.client_resolved = False
        self.status: int | None = None
        self.response_started: float | None = None
        self.response_ended: float | None = None
        self.bytes_sent = 0
        self.exception: BaseException | None = None
        self.exception_logged: BaseException | None = None
        self.exception_reported: BaseException | None = None
        self.reported_exception: BaseException | None = None
        self.disconnected = False
        self.rate_limited: bool | Literal["error"] | None = None
        self.error_format: ErrorFormat | None = None
        self.error_rendered = False
        self.debug = False
        self.envelope_meta: dict[str, Any] | None = None
        self.envelope_skip = False
        self.recording = False
        self.response_headers: list[tuple[bytes, bytes]] | None = None
        self.replaced_headers: tuple[bytes, ...] = ()
        self.traced = False
        self.trace_id: str | None = None
        self._route: str | None = None
        self._start_headers: Iterable[tuple[bytes, bytes]] = ()
        self.before_last_body: Callable[[int], None] | None = None

    @staticmethod
    def current() -> RequestContext | None:
        """The context of the request being handled by the running task, if any."""
        return _current.get()

    @property
    def complete(self) -> bool:
        """The whole response (start and last body message) went out."""
        return self.response_ended is not None

    def current_trace_id(self) -> str | None:
        """The trace id of the request's span (32 hex), looked up once per request."""
        if not self.traced:
            self.traced = True
            self.trace_id = current_trace_id()
        return self.trace_id

    def keep_exception(self, exc: BaseException) -> None:
        """Remember ``exc`` unless an inner layer already recorded the request's exception."""
        if self.exception is None:
            self.exception = exc

    def replace_exception(self, exc: BaseException) -> None:
        """``exc`` is the request's exception, whatever an inner layer kept: the error layer's
        word on what reached it."""
        self.exception = exc

    def report_handled_exception(self, exc: BaseException) -> None:
        """The application's framework caught ``exc`` and rendered its own response: when that
        is a 5xx, the error layer makes it the request's exception (counted, traced) and logs
        it once; a 4xx the app's own handler mapped it to is an answer, not a fault."""
        self.reported_exception = exc

    def mark_logged(self, exc: BaseException) -> None:
        """``exc``'s traceback was logged: no other layer logs it again."""
        self.exception_logged = exc

    def mark_disconnected(self) -> None:
        """The response will not complete: the client went away, or the server gave up."""
        self.disconnected = True

    def mark_ours(self) -> None:
        """The response in flight is rendered by this library (an error body, a health or
        metrics endpoint): ``ErrorMiddleware`` leaves it as it is."""
        self.error_rendered = True

    def use_trace_id(self, trace_id: str | None) -> None:
        """The request's trace id (``None``: no valid span), found by the tracing layer:
        ``current_trace_id()`` answers it without looking again."""
        self.traced = True
        self.trace_id = trace_id

    def add_response_headers(
        self, headers: Iterable[tuple[bytes, bytes]], *, replace: bytes | None = None
    ) -> None:
        """Have ``headers`` written on the response start, whichever layer sends it.

        Call it before the response starts and send through ``record``: one ``send`` wrapper
        (the outermost layer's) then writes the headers of every layer, on the response the
        client really gets (an error the application raised and a layer outside rendered
        included). Layers between that wrapper and the caller do not see them. ``replace``: a
        lowercase header name owned by the caller: values the application set, and values an
        outer layer registered before (a second request id layer), are dropped.
        """
        if self.response_headers is None:
            self.response_headers = []
        elif replace is not None:
            self.response_headers = [h for h in self.response_headers if h[0] != replace]
        self.response_headers.extend(headers)
        if replace is not None and replace not in self.replaced_headers:
            self.replaced_headers = (*self.replaced_headers, replace)

    def route(self, scope: Scope) -> str:
        """The route template that handled the request (``/users/{user_id}``), computed once.

        Read after the application returned: Starlette and FastAPI put the matched route in
        ``scope["route"]``; other frameworks may put the template there as a string. Mount
        prefixes are joined in. Anything else is ``UNMATCHED_ROUTE``.
        """
        if self._route is None:
            self._route = route_template(scope)
        return self._route

    def record(self, send: Send) -> Send:
        """Wrap ``send`` to record status, bytes and timings here and to write the
        ``response_headers`` (once per request: inner layers get ``send`` back unchanged)."""
        if self.recording:
            return send
        self.recording = True

        async def send_and_record(message: Message) -> None:
            message_type = message["type"]
            if message_type == "http.response.start":
                if self.response_headers:
                    message = self._with_headers(message, self.response_headers)
            elif self.before_last_body is not None:
                self.last_body_hook(message)
            try:
                await send(message)
            except OSError:
                self.disconnected = True
                raise
            if message_type == "http.response.start":
                self.status = message["status"]
                self._start_headers = message.get("headers", ())
                self.response_started = perf_counter()
            elif message_type == "http.response.body":
                self.bytes_sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self.response_ended = perf_counter()
            elif message_type == "http.response.pathsend":
                self.bytes_sent += _content_length(self._start_headers)
                self.response_ended = perf_counter()

        return send_and_record

    def last_body_hook(self, message: Message) -> None:
        """Run ``before_last_body`` (once) if ``message`` is the response's last."""
        hook = self.before_last_body
        if hook is not None and (
            message["type"] == "http.response.pathsend"
            or (message["type"] == "http.response.body" and not message.get("more_body", False))
        ):
            self.before_last_body = None
            hook(len(message.get("body", b"")))

    def _with_headers(self, start: Message, added: list[tuple[bytes, bytes]]) -> Message:
        headers = start.get("headers", ())
        replaced = self.replaced_headers
        if len(replaced) == 1:
            # Compare lengths before lowering: most headers are skipped without a copy.
            name = replaced[0]
            length = len(name)
            headers = [h for h in headers if len(h[0]) != length or h[0].lower() != name]
        elif replaced:
            headers = [h for h in headers if h[0].lower() not in replaced]
        return {**start, "headers": [*headers, *added]}


class ContextMiddleware:
    """Base of our HTTP middlewares: passes other scopes through, finds or creates the context.

    Subclasses implement ``handle``. The layer that creates the context also publishes it in a
    context variable for the duration of the request and resets it afterwards.
    """

    app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = scope.get(CONTEXT_KEY)
        if context is not None:
            await self.handle(context, scope, receive, send)
            return
        context = scope[CONTEXT_KEY] = RequestContext(scope)
        token = _current.set(context)
        try:
            await self.handle(context, scope, receive, send)
        finally:
            _current.reset(token)

    async def handle(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        raise NotImplementedError  # pragma: no cover - every subclass implements it


def path_matcher(route: str, *, option: str = "routes") -> Callable[[str], bool]:
    """A test of request paths against a ``routes`` key: a route template (``"/items/{item_id}"``,
    Starlette's syntax and converters) or a path prefix (``"/admin"``: it and everything below).

    Raises:
        ValueError: ``route`` does not start with ``/``.
    """
    if not isinstance(route, str) or not route.startswith("/"):
        raise ValueError(f"{option} keys must start with '/', got {route!r}")
    if "{" in route:
        from starlette.routing import compile_path

        regex = compile_path(route)[0]
        return lambda path: regex.match(path) is not None
    prefix = route.rstrip("/")
    return lambda path: path == prefix or path.startswith(prefix + "/") or not prefix


# The request's deadline (anyio.current_time() clock), set by TimeoutMiddleware for the request.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "asgi_resilience_deadline", default=None
)


def get_deadline() -> float | None:
    """The current request's deadline on the ``anyio.current_time()`` clock, or ``None`` when
    no ``TimeoutMiddleware`` gave it one."""
    return _deadline.get()


def remaining_time() -> float | None:
    """Seconds left before the current request's deadline (0 once it passed), or ``None``
    without a deadline. Inside a running event loop only."""
    deadline = _deadline.get()
    if deadline is None:
        return None
    import anyio

    return max(0.0, deadline - anyio.current_time())


def route_path(scope: Scope) -> str:
    """The path the application routes on: ``scope["path"]`` without the ``root_path`` prefix
    a server may have put in front (uvicorn ``--root-path /api``: ``/api/health/ready`` is
    ``/health/ready`` here), by Starlette's own rule, so the stack's paths (health, metrics,
    exclusions, routes) mean what they mean to the app's router."""
    path: str = scope["path"]
    root_path = scope.get("root_path")
    if not root_path or not path.startswith(root_path):
        return path
    rest = path[len(root_path) :]
    if not rest:
        return "/"
    return rest if rest[0] == "/" else path


class PathSet:
    """Paths and everything below them: ``"/health"`` covers ``/health`` and ``/health/ready``,
    not ``/healthz``. What every ``exclude_paths``/``exempt_paths`` option means.

    Args:
        paths: the paths, each starting with ``/``.
        option: the option's name, for the error message.
    """

    __slots__ = ("exact", "prefixes")

    def __init__(self, paths: Iterable[str], *, option: str = "exclude_paths") -> None:
        if isinstance(paths, str):
            raise ValueError(f"{option} must be a list of paths, e.g. [{paths!r}], not a string")
        paths = tuple(paths)
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"{option} entries must start with '/', got {path!r}")
        self.exact = frozenset(path.rstrip("/") or "/" for path in paths)
        self.prefixes = tuple(path.rstrip("/") + "/" for path in paths)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and (path in self.exact or path.startswith(self.prefixes))


def current_trace_id() -> str | None:
    """The trace id (32 hex) of the active OpenTelemetry span, if there is a valid one."""
    return trace_id_of(trace.get_current_span())


def trace_id_of(span: trace.Span) -> str | None:
    """The trace id of ``span`` as 32 lowercase hex (W3C form), ``None`` for an invalid span."""
    span_context = span.get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
