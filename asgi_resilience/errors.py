"""Error normalization: every error, raised or returned, leaves as one JSON shape.

``ErrorMiddleware`` sits outside the user's application (so Starlette's own 500 page is replaced
too) and produces either RFC 9457 ``application/problem+json`` or the envelope error shape.
``render_error`` is the one renderer every layer uses for the responses it answers itself (400 for
a rejected request id, 429, 503), so all error bodies look alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

from .context import (
    ContextMiddleware,
    ErrorFormat,
    RequestContext,
    current_trace_id,
    utc_timestamp,
)
from .exceptions import AppError, CircuitOpenError, snake_case, status_phrase
from .types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ErrorMiddleware", "default_debug", "render_error"]

_logger = logging.getLogger("asgi_resilience.errors")

PROBLEM_CONTENT_TYPE = b"application/problem+json"
JSON_CONTENT_TYPE = b"application/json"
_DEVELOPMENT_ENVIRONMENTS = frozenset({"development", "dev", "local"})
# Headers of a rewritten response that describe the old body, not the new one.
_BODY_HEADERS = frozenset({b"content-type", b"content-length", b"content-encoding"})
# Members of a returned JSON error body that must not become problem extension members.
_RESERVED_MEMBERS = frozenset(
    {"type", "title", "status", "detail", "instance", "code", "request_id", "trace_id", "errors"}
)
_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_MAX_DETAIL_CHARS = 1000


def default_debug() -> bool:
    """Debug mode from the environment: ``APP_ENV`` or ``ENVIRONMENT`` is development/dev/local."""
    environment = os.environ.get("APP_ENV") or os.environ.get("ENVIRONMENT") or ""
    return environment.strip().lower() in _DEVELOPMENT_ENVIRONMENTS


def render_error(
    context: RequestContext | None,
    scope: Scope,
    status: int,
    *,
    detail: str | None = None,
    title: str | None = None,
    code: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    extra: Mapping[str, Any] | None = None,
    errors: list[Any] | None = None,
    exception: BaseException | None = None,
    error_format: ErrorFormat | None = None,
) -> tuple[Message, Message]:
    """Build the ``http.response.start`` and body messages of an error response.

    The shape is ``error_format`` if given, else the one ``ErrorMiddleware`` chose for this
    request, else a problem. ``exception`` details (type, message, traceback) are included only
    when the request's context is in debug mode. Marks the context so ``ErrorMiddleware`` leaves
    the response alone.
    """
    title = title or status_phrase(status)
    code = code or snake_case(title)
    error_format = error_format or (context.error_format if context else None) or "problem"
    request_id = context.request_id if context else None
    debug_info = _exception_info(exception) if exception and context and context.debug else None
    if error_format == "envelope":
        content_type = JSON_CONTENT_TYPE
        details: Any = errors if errors is not None else (dict(extra) if extra else None)
        error: dict[str, Any] = {
            "code": code,
            "message": detail or title,
            "status": status,
            "details": details,
        }
        if debug_info:
            error["exception"] = debug_info
        body: dict[str, Any] = {
            "success": False,
            "error": error,
            "meta": {"request_id": request_id, "timestamp": utc_timestamp()},
        }
    else:
        content_type = PROBLEM_CONTENT_TYPE
        body = {"type": "about:blank", "title": title, "status": status}
        if detail:
            body["detail"] = detail
        body["instance"] = scope.get("path", "")
        body["code"] = code
        body["request_id"] = request_id
        trace_id = context.current_trace_id() if context is not None else current_trace_id()
        if trace_id:
            body["trace_id"] = trace_id
        if errors is not None:
            body["errors"] = errors
        if extra:
            body.update((k, v) for k, v in extra.items() if k not in _RESERVED_MEMBERS)
        if debug_info:
            body["exception"] = debug_info
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    response_headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(payload)).encode()),
        *_safe_headers(headers),
    ]
    if context is not None:
        context.error_rendered = True
    start = {"type": "http.response.start", "status": status, "headers": response_headers}
    return start, {"type": "http.response.body", "body": payload, "more_body": False}


class ErrorMiddleware(ContextMiddleware):
    """Turn every error into one JSON shape: RFC 9457 problem+json or the envelope error.

    Handles ``http`` scopes; others pass through. While nothing has been sent it converts raised
    ``AppError``, Starlette/FastAPI ``HTTPException`` (headers kept), FastAPI
    ``RequestValidationError`` (422 with ``errors``), ``CircuitOpenError`` (503 with
    ``Retry-After``) and any other exception (500, logged once with traceback and request id; its
    message only shown in debug mode). Error responses the application returned (status >= 400,
    not already problem+json, not content-encoded, up to ``max_body_size`` bytes) are rewritten
    into the same shape, keeping their headers (``Allow``, ``WWW-Authenticate``, ...); their text
    or ``{"detail": ...}`` becomes ``detail``.

    A framework's generic 500 page (Starlette's ``ServerErrorMiddleware`` sends one and then
    re-raises) is held until the application returns: the exception then decides the body.
    Other error responses go out as soon as their body is complete. An exception after
    the response started sends nothing more; it is logged once and re-raised so the server
    closes the connection (or swallowed if the response was complete).

    Sets ``error_format`` and ``debug`` on the request context for inner layers. Place it outside
    the application and inside the request id, metrics and access-log layers.

    Args:
        app: the ASGI application.
        debug: include exception type, message and traceback in 500 bodies. ``None`` reads
            ``APP_ENV``/``ENVIRONMENT`` (development, dev, local mean debug).
        format: ``"problem"`` (RFC 9457) or ``"envelope"``.
        rewrite_responses: also rewrite error responses the application returned.
        max_body_size: the largest returned error body rewritten; larger ones pass unchanged.
        logger: where unhandled exceptions are logged (``asgi_resilience.errors``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        debug: bool | None = None,
        format: ErrorFormat = "problem",
        rewrite_responses: bool = True,
        max_body_size: int = 64 * 1024,
        logger: logging.Logger | None = None,
    ) -> None:
        if format not in ("problem", "envelope"):
            raise ValueError(f"format must be 'problem' or 'envelope', got {format!r}")
        if max_body_size < 0:
            raise ValueError(f"max_body_size must be >= 0 bytes, got {max_body_size!r}")
        self.app = app
        self.debug = default_debug() if debug is None else debug
        self.format: ErrorFormat = format
        self.rewrite_responses = rewrite_responses
        self.max_body_size = max_body_size
        self.logger = logger if logger is not None else _logger

    async def handle(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        context.error_format = self.format
        context.debug = self.debug
        responder = _ErrorResponder(self, context, scope, send)
        try:
            await self.app(scope, receive, responder.send)
        except Exception as exc:
            if not await responder.fail(exc):
                raise
        else:
            await responder.finish()


class _ErrorResponder:
    """Per-request state of ``ErrorMiddleware``: what was sent, what is held back."""

    __slots__ = (
        "completed",
        "context",
        "held_body",
        "held_start",
        "middleware",
        "scope",
        "send_downstream",
        "started",
    )

    def __init__(
        self, middleware: ErrorMiddleware, context: RequestContext, scope: Scope, send: Send
    ) -> None:
        self.middleware = middleware
        self.context = context
        self.scope = scope
        self.send_downstream = send
        self.started = False
        self.completed = False
        self.held_start: Message | None = None
        self.held_body = bytearray()

    async def send(self, message: Message) -> None:
        if self.held_start is not None:
            await self._hold_or_release(message)
            return
        if message["type"] == "http.response.start":
            if self._should_rewrite(message):
                self.held_start = message
                self.held_body.clear()
                return
            self.context.error_rendered = False
            self.started = True
        elif message["type"] == "http.response.pathsend" or (
            message["type"] == "http.response.body" and not message.get("more_body", False)
        ):
            self.completed = True
        await self.send_downstream(message)

    def _should_rewrite(self, message: Message) -> bool:
        if message["status"] < 400 or self.context.error_rendered:
            return False
        if not self.middleware.rewrite_responses or self.scope.get("method") == "HEAD":
            return False
        for name, value in message.get("headers", ()):
            lowered = name.lower()
            if lowered == b"content-encoding":
                return False
            if lowered == b"content-type" and value.split(b";", 1)[0].strip().lower() in (
                PROBLEM_CONTENT_TYPE,
            ):
                return False
        return True

    async def _hold_or_release(self, message: Message) -> None:
        assert self.held_start is not None
        if message["type"] != "http.response.body":
            await self._release(message)  # pathsend, trailers...: not ours to rewrite
            return
        self.held_body += message.get("body", b"")
        if len(self.held_body) > self.middleware.max_body_size:
            await self._release(message)
        elif not message.get("more_body", False) and not self._exception_follows():
            await self._send_rewritten()

    def _exception_follows(self) -> bool:
        """Is the complete response held a framework's 500 page, sent just before it re-raises
        the exception (Starlette's ``ServerErrorMiddleware``: "Internal Server Error" as text,
        or its HTML debug page)? Then wait for the exception, which decides the body. Any other
        error response goes out now: holding it would make the client wait for background
        tasks run after it."""
        assert self.held_start is not None
        if self.held_start["status"] != 500:
            return False
        content_type = _content_type(self.held_start.get("headers", ()))
        if content_type == b"text/html":
            return True
        return content_type == b"text/plain" and bytes(self.held_body) == b"Internal Server Error"

    async def _release(self, message: Message) -> None:
        """Give up rewriting: send the held response as it was, then ``message``."""
        assert self.held_start is not None
        start, body = self.held_start, bytes(self.held_body)
        self.held_start = None
        self.started = True
        await self.send_downstream(start)
        if message["type"] == "http.response.body":
            more_body = message.get("more_body", False)
            await self.send_downstream(
                {"type": "http.response.body", "body": body, "more_body": more_body}
            )
            self.completed = not more_body
            return
        if body:
            await self.send_downstream(
                {"type": "http.response.body", "body": body, "more_body": True}
            )
        await self.send(message)

    async def _send_rewritten(self) -> None:
        assert self.held_start is not None
        start, body = self.held_start, bytes(self.held_body)
        self.held_start = None
        status = start["status"]
        headers = [(n, v) for n, v in start.get("headers", ()) if n.lower() not in _BODY_HEADERS]
        content_type = _content_type(start.get("headers", ()))
        if status == 500 and not self.middleware.debug:
            # A 500 body may be a framework's traceback page or an exception's text: in
            # production a 500 says nothing of its cause, whoever wrote it.
            fields: dict[str, Any] = {}
        else:
            fields = _describe_body(content_type, body)
        if fields.get("detail") == status_phrase(status):
            del fields["detail"]  # as for a raised HTTPException: the title says it already
        await self._send(status, headers=headers, **fields)

    async def finish(self) -> None:
        """The application returned: send a held 5xx response (completed or not)."""
        if self.held_start is not None:
            await self._send_rewritten()

    async def fail(self, exc: Exception) -> bool:
        """Answer for ``exc``; ``False`` when it must propagate (the response is half sent)."""
        context = self.context
        already_logged = context.exception_logged is exc
        context.exception = exc
        if self.started:
            if not already_logged:
                self._log(exc, "after the response started")
            # Complete (a failing background task): the client has its whole response. Half
            # sent: only the server can end it, by closing the connection.
            return self.completed
        self.held_start = None
        status, fields = _describe_exception(exc)
        if status >= 500 and not isinstance(exc, (AppError, CircuitOpenError)):
            if not already_logged:
                self._log(exc, "")
            fields.setdefault("exception", exc)
        elif status >= 500:
            self.middleware.logger.warning(
                "%s answered %d: %s", type(exc).__name__, status, exc, extra=self._extra()
            )
        await self._send(status, **fields)
        return True

    async def _send(self, status: int, **fields: Any) -> None:
        start, body = render_error(self.context, self.scope, status, **fields)
        self.started = self.completed = True
        await self.send_downstream(start)
        await self.send_downstream(body)

    def _log(self, exc: Exception, when: str) -> None:
        self.context.exception_logged = exc
        self.middleware.logger.error(
            "Unhandled %s in %s %s%s",
            type(exc).__name__,
            self.scope.get("method"),
            self.scope.get("path"),
            f" ({when})" if when else "",
            exc_info=exc,
            extra=self._extra(),
        )

    def _extra(self) -> dict[str, Any]:
        return {"request_id": self.context.request_id}


def _describe_exception(exc: Exception) -> tuple[int, dict[str, Any]]:
    """Status and ``render_error`` fields for a raised exception."""
    if isinstance(exc, AppError):
        return exc.status_code, {
            "detail": exc.detail,
            "title": exc.title,
            "code": exc.code,
            "headers": _encode_headers(exc.headers.items()),
            "extra": exc.extra,
        }
    if isinstance(exc, CircuitOpenError):
        retry_after = max(1, math.ceil(exc.retry_after))
        return 503, {
            "detail": "A dependency is temporarily unavailable; retry later.",
            "code": "circuit_open",
            "headers": [(b"retry-after", str(retry_after).encode())],
        }
    validation_error = _fastapi_validation_error()
    if validation_error is not None and isinstance(exc, validation_error):
        return 422, {"detail": "Request validation failed", "errors": list(exc.errors())}
    http_exception = _starlette_http_exception()
    if http_exception is not None and isinstance(exc, http_exception):
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else None
        fields: dict[str, Any] = {
            "detail": None if detail == status_phrase(status) else detail,
            "headers": _encode_headers((exc.headers or {}).items()),
        }
        if exc.detail is not None and not isinstance(exc.detail, str):
            fields["extra"] = {"details": exc.detail}  # FastAPI allows any JSON detail
        return status, fields
    return 500, {}


def _starlette_http_exception() -> type[Any] | None:
    module = sys.modules.get("starlette.exceptions")
    return getattr(module, "HTTPException", None)


def _fastapi_validation_error() -> type[Any] | None:
    # FastAPI is not a dependency: if it was never imported, nothing can raise its errors.
    module = sys.modules.get("fastapi.exceptions")
    return getattr(module, "RequestValidationError", None)


def _describe_body(content_type: bytes, body: bytes) -> dict[str, Any]:
    """``render_error`` fields kept from an error body the application returned."""
    if content_type == JSON_CONTENT_TYPE or content_type.endswith(b"+json"):
        try:
            document = json.loads(body)
        except ValueError:
            return {}
        if not isinstance(document, dict):
            return {}
        fields: dict[str, Any] = {}
        detail = document.get("detail", document.get("message", document.get("error")))
        if isinstance(detail, str):
            fields["detail"] = detail[:_MAX_DETAIL_CHARS]
        elif isinstance(detail, list):
            fields["detail"] = "Request validation failed"
            fields["errors"] = detail
        extra = {
            k: v
            for k, v in document.items()
            if k not in _RESERVED_MEMBERS and k not in ("message", "error")
        }
        if isinstance(detail, dict):
            extra["details"] = detail  # FastAPI's HTTPException takes any JSON detail
        if extra:
            fields["extra"] = extra
        return fields
    if content_type == b"text/plain":
        text = body.decode("utf-8", "replace").strip()
        if text and len(text) <= _MAX_DETAIL_CHARS:
            return {"detail": text}
    return {}  # HTML error pages and the like: nothing a JSON client can use


def _content_type(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""


def _encode_headers(items: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    encoded = []
    for name, value in items:
        try:
            encoded.append((name.lower().encode("latin-1"), str(value).encode("latin-1")))
        except UnicodeEncodeError:
            _logger.warning("Dropped error response header %r: not latin-1", name)
    return encoded


def _safe_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop headers a server would reject (or that would split the response: CR, LF)."""
    safe = []
    for name, value in headers:
        if _HEADER_NAME.fullmatch(name) and _HEADER_VALUE.fullmatch(value):
            safe.append((name, value))
        else:
            _logger.warning("Dropped invalid error response header %r: %r", name, value)
    return safe


def _exception_info(exc: BaseException) -> dict[str, Any]:
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
    }
