"""Access log: one structured record per HTTP request, and a JSON formatter for any record."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from time import perf_counter
from typing import Any

from .context import PROBE_PATHS, ContextMiddleware, PathSet, RequestContext, format_timestamp
from .proxies import TrustedProxies
from .types import ASGIApp, Receive, Scope, Send

__all__ = ["DEFAULT_EXCLUDE_PATHS", "AccessLogMiddleware", "JsonFormatter"]

DEFAULT_EXCLUDE_PATHS = PROBE_PATHS

_logger = logging.getLogger("asgi_resilience.access")


class AccessLogMiddleware(ContextMiddleware):
    """Log one record per HTTP request when it is over, on the ``asgi_resilience.access`` logger.

    Handles ``http`` scopes; others pass through. The record's message reads
    ``GET /items/1 200 3.1ms``; its ``extra`` fields are ``request_id, method, path, route,
    status, duration_ms, ttfb_ms, bytes_sent, client, user_agent, http_version``, plus
    ``trace_id`` (a span is active), ``rate_limited`` (a rate limiter decided: ``true``,
    ``false``, or ``"error"`` when its backend failed), ``error`` (the exception type, when one
    was raised), ``disconnected`` (the response never completed: the
    client went away; ``status`` is then only what was really sent, or ``None``) and ``query``
    (only with ``include_query``, the query string may carry personal data).

    Level: ``ERROR`` for 5xx, ``WARNING`` for 4xx, disconnects and requests slower than
    ``slow_threshold`` seconds, ``INFO`` otherwise. ``duration_ms`` runs from the first layer
    seeing the request to the last body byte sent (or the application returning), so background
    tasks run after the response are not counted. Reads no headers but ``User-Agent``; writes
    none. Place it inside the request id, tracing and metrics layers, outside ``ErrorMiddleware``
    (so it logs the status the client really got).

    Args:
        app: the ASGI application.
        logger: the logger records go to.
        exclude_paths: paths (and their subpaths) not logged; probes and scrapes by default.
        slow_threshold: seconds after which a successful request is logged as a warning.
        include_query: add the raw query string as ``query``.
        trusted_proxies: proxies whose forwarding header names the ``client`` (a list, or a
            ``TrustedProxies``; resolved once per request, shared with the rate limiter).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        logger: logging.Logger | None = None,
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
        slow_threshold: float = 1.0,
        include_query: bool = False,
        trusted_proxies: Iterable[str] | TrustedProxies = (),
    ) -> None:
        if not slow_threshold > 0:
            raise ValueError(
                f"slow_threshold must be a positive number of seconds, got {slow_threshold!r}"
            )
        self.app = app
        self.excluded = PathSet(exclude_paths, option="exclude_paths")
        self.logger = logger if logger is not None else _logger
        self.slow_threshold = slow_threshold
        self.include_query = include_query
        self.proxies = TrustedProxies.of(trusted_proxies)

    async def handle(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        path = scope["path"]
        if path in self.excluded:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, context.record(send))
        except BaseException as exc:
            context.keep_exception(exc)
            if not isinstance(exc, Exception):
                context.disconnected = True  # cancelled: the server gave up on the request
            self._log(context, scope)
            raise
        self._log(context, scope)

    def _log(self, context: RequestContext, scope: Scope) -> None:
        now = perf_counter()
        ended = context.response_ended
        status = context.status
        disconnected = context.disconnected or (ended is None and context.exception is None)
        if status is None and context.exception is not None and not disconnected:
            status = 500  # what every ASGI server answers for an exception before any response
        duration = (ended if ended is not None else now) - context.start
        if (status is not None and status >= 500) or (
            context.exception is not None and ended is None and not disconnected
        ):
            level = logging.ERROR  # a 5xx, or a response cut short by an exception
        elif disconnected or (status is not None and status >= 400):
            level = logging.WARNING
        elif duration > self.slow_threshold:
            level = logging.WARNING
        else:
            level = logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        started = context.response_started
        method = scope["method"]
        path = scope["path"]
        # What Logger.log does, minus findCaller's walk up the stack (the caller is always this
        # line) and makeRecord's check of each extra key against the record (ours never clash):
        # together they were half the cost of a record. The fields go straight into the record.
        record = logging.getLogRecordFactory()(
            self.logger.name,
            level,
            __file__,
            0,
            "%s %s %s %.1fms",
            (method, path, status if status is not None else "-", duration * 1000),
            None,
        )
        fields = record.__dict__
        fields["request_id"] = context.request_id
        fields["method"] = method
        fields["path"] = path
        fields["route"] = context.route(scope)
        fields["status"] = status
        fields["duration_ms"] = round(duration * 1_000_000) / 1000  # to the microsecond
        fields["ttfb_ms"] = round((started - context.start) * 1_000_000) / 1000 if started else None
        fields["bytes_sent"] = context.bytes_sent
        fields["client"] = self.proxies.apply(context, scope) if self.proxies else context.client
        fields["user_agent"] = _user_agent(scope)
        fields["http_version"] = scope.get("http_version")
        trace_id = context.current_trace_id()
        if trace_id is not None:
            fields["trace_id"] = trace_id
        if context.rate_limited is not None:
            fields["rate_limited"] = context.rate_limited
        if context.exception is not None:
            fields["error"] = type(context.exception).__name__
        if disconnected:
            fields["disconnected"] = True
        if self.include_query:
            fields["query"] = scope.get("query_string", b"").decode("latin-1")
        self.logger.handle(record)


def _user_agent(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"user-agent":
            return str(value.decode("latin-1"))
    return None


# Attributes every LogRecord has; anything else on a record came from ``extra`` or a filter.
# uvicorn's ``color_message`` is its message again with terminal colours: noise in JSON.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """Render any log record as one JSON line, with every ``extra`` field as a member.

    Members: ``timestamp`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``,
    then the record's extra fields (``request_id``, ``route``, ...), then ``exc_info`` and
    ``stack_info`` as text when present. Values JSON cannot encode are written with ``str()``.
    The library never installs it; attach it to your own handler.

    Args:
        static_fields: members added to every line (``service``, ``version``).
    """

    def __init__(self, *, static_fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static_fields = dict(static_fields or {})

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": format_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.static_fields:
            payload.update(self.static_fields)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES:
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        try:
            return _encode(payload)
        except (TypeError, ValueError, RecursionError):
            # Non-string dict keys, circular references: keep the line, lose only the detail.
            return _encode({key: _encodable(value) for key, value in payload.items()})


def _encodable(value: Any) -> Any:
    try:
        _encode(value)
    except (TypeError, ValueError, RecursionError):
        return str(value)
    return value


def _make_encoder() -> Callable[[Any], str]:
    """One encoder for every line. ``json.dumps()`` with options builds an encoder per call,
    and ``JSONEncoder.encode`` still builds its C encoder per call: build that once (where the
    C accelerator exists). No circular-reference check; a cycle raises ``RecursionError``,
    which ``format`` handles like any value JSON cannot take."""
    if c_make_encoder is None:  # pragma: no cover - CPython always has the accelerator
        return json.JSONEncoder(ensure_ascii=False, default=str).encode
    encoder = c_make_encoder(None, str, encode_basestring, None, ": ", ", ", False, False, True)
    return lambda value: "".join(encoder(value, 0))


_encode = _make_encoder()
