"""The error bodies: RFC 9457 problems and envelope errors, and what each error becomes.

``render_error`` is the one renderer every layer uses for the responses it answers itself (a
rejected request id, 429, 503, 404 of a health path), so all error bodies look alike;
``describe_exception`` and ``describe_body`` turn a raised exception or a returned error body into
its fields. ``ErrorMiddleware`` (``errors.py``) decides when to use them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

from ._http import HEADER_NAME_BYTES, media_type
from .context import ErrorFormat, RequestContext, current_trace_id, utc_timestamp
from .exceptions import AppError, CircuitOpenError, snake_case, status_phrase
from .types import Message, Scope, Send

__all__ = [
    "JSON_CONTENT_TYPE",
    "PROBLEM_CONTENT_TYPE",
    "describe_body",
    "describe_exception",
    "render_error",
    "send_error",
]

_logger = logging.getLogger("asgi_resilience.errors")

PROBLEM_CONTENT_TYPE = b"application/problem+json"
JSON_CONTENT_TYPE = b"application/json"
# Members of a returned JSON error body that must not become problem extension members.
_RESERVED_MEMBERS = frozenset(
    {"type", "title", "status", "detail", "instance", "code", "request_id", "trace_id", "errors"}
)
_HEADER_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_MAX_DETAIL_CHARS = 1000


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
    problem_type: str | None = None,
) -> tuple[Message, Message]:
    """Build the ``http.response.start`` and body messages of an error response.

    The shape is ``error_format`` if given, else the one ``ErrorMiddleware`` chose for this
    request, else a problem. ``exception`` details (type, message, traceback) are included only
    when the request's context is in debug mode. ``problem_type`` is the problem's ``type`` URI
    (``about:blank`` without). Marks the context so ``ErrorMiddleware`` leaves the response
    alone.
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
        body = {"type": problem_type or "about:blank", "title": title, "status": status}
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
        context.mark_ours()
    start = {"type": "http.response.start", "status": status, "headers": response_headers}
    return start, {"type": "http.response.body", "body": payload, "more_body": False}


async def send_error(
    context: RequestContext | None, scope: Scope, send: Send, status: int, **fields: Any
) -> None:
    """Render an error response with ``render_error(context, scope, status, **fields)`` and send
    it: what every layer that answers by itself (400, 404, 405, 429, 503) does."""
    start, body = render_error(context, scope, status, **fields)
    await send(start)
    await send(body)


def describe_exception(exc: Exception) -> tuple[int, dict[str, Any]]:
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


def describe_body(content_type: bytes, body: bytes) -> dict[str, Any]:
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


def content_type_of(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-type":
            return media_type(value)
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
        if HEADER_NAME_BYTES.fullmatch(name) and _HEADER_VALUE.fullmatch(value):
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
