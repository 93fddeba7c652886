"""Error normalization: every error, raised or returned, leaves as one JSON shape.

``ErrorMiddleware`` sits outside the user's application (so Starlette's own 500 page is replaced
too) and produces either RFC 9457 ``application/problem+json`` or the envelope error shape, with
the renderer of ``problems.py`` that every layer shares.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ._checks import check_bool, check_callable, check_count, check_logger
from ._http import media_type
from .context import ContextMiddleware, ErrorFormat, RequestContext
from .exceptions import AppError, CircuitOpenError, status_phrase
from .problems import (
    PROBLEM_CONTENT_TYPE,
    content_type_of,
    describe_body,
    describe_exception,
    render_error,
    send_error,
)
from .types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ErrorHook", "ErrorMiddleware", "default_debug", "render_error"]

# ``on_error(exc, context)``: hands an unhandled exception to an error reporter (Sentry,
# Rollbar...); may return an awaitable, which is awaited.
ErrorHook = Callable[[Exception, RequestContext], Any]

_logger = logging.getLogger("asgi_resilience.errors")

_DEVELOPMENT_ENVIRONMENTS = frozenset({"development", "dev", "local"})
# Headers of a rewritten response that describe the old body, not the new one.
_BODY_HEADERS = frozenset({b"content-type", b"content-length", b"content-encoding"})


def default_debug(environ: Mapping[str, str] | None = None) -> bool:
    """Debug mode from the environment (``os.environ`` unless ``environ`` is given): ``APP_ENV``
    or ``ENVIRONMENT`` is development/dev/local."""
    if environ is None:
        environ = os.environ
    environment = environ.get("APP_ENV") or environ.get("ENVIRONMENT") or ""
    return environment.strip().lower() in _DEVELOPMENT_ENVIRONMENTS


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
        on_error: called once per unhandled exception (the ones logged with a traceback: a
            500, an exception after the response started, a 5xx the framework rendered and
            reported) with ``(exc, context)``, ``context`` being the request's
            ``RequestContext`` (``context.request_id``, ``context.client``,
            ``context.status``). Hand it to an error reporter there. It runs in the request's
            task after the response went out (the client never waits for it); it may be
            ``async``. If it raises, that is logged and the response is unchanged. Not called
            for ``AppError``s, HTTP exceptions and other answers the client caused.
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
        on_error: ErrorHook | None = None,
    ) -> None:
        if format not in ("problem", "envelope"):
            raise ValueError(f"format must be 'problem' or 'envelope', got {format!r}")
        check_count("max_body_size", max_body_size)
        if debug is not None:
            check_bool("debug", debug)
        check_bool("rewrite_responses", rewrite_responses)
        check_logger("logger", logger)
        check_callable("on_error", on_error)
        self.app = app
        self.debug = default_debug() if debug is None else debug
        self.format: ErrorFormat = format
        self.rewrite_responses = rewrite_responses
        self.max_body_size = max_body_size
        self.logger = logger if logger is not None else _logger
        self.on_error = on_error

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
        "unreported",
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
        self.unreported: Exception | None = None  # logged, not yet given to on_error

    async def send(self, message: Message) -> None:
        if self.held_start is not None:
            await self._hold_or_release(message)
            return
        if message["type"] == "http.response.start":
            if self._should_rewrite(message):
                self.held_start = message
                self.held_body.clear()
                return
            self.context.error_rendered = False  # the app's own response: ours to rewrite
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
        hidden = self._hidden(message)
        for name, value in message.get("headers", ()):
            lowered = name.lower()
            if lowered == b"content-encoding" and not hidden:
                return False
            if lowered == b"content-type" and media_type(value) == PROBLEM_CONTENT_TYPE:
                return False
        return True

    def _hidden(self, start: Message) -> bool:
        """A 500 in production: whatever its size, encoding or form, its body never goes out
        (it may be a traceback or an exception's text)."""
        return bool(start["status"] == 500 and not self.middleware.debug)

    async def _hold_or_release(self, message: Message) -> None:
        assert self.held_start is not None
        hidden = self._hidden(self.held_start)
        if message["type"] != "http.response.body":
            if hidden and message["type"] == "http.response.pathsend":
                await self._send_rewritten()
            else:
                await self._release(message)  # pathsend, trailers...: not ours to rewrite
            return
        if len(self.held_body) <= self.middleware.max_body_size:
            self.held_body += message.get("body", b"")
        if len(self.held_body) > self.middleware.max_body_size and not hidden:
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
        content_type = content_type_of(self.held_start.get("headers", ()))
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
        content_type = content_type_of(start.get("headers", ()))
        if status == 500 and not self.middleware.debug:
            # A 500 body may be a framework's traceback page or an exception's text: in
            # production a 500 says nothing of its cause, whoever wrote it.
            fields: dict[str, Any] = {}
        else:
            fields = describe_body(content_type, body)
        if fields.get("detail") == status_phrase(status):
            del fields["detail"]  # as for a raised HTTPException: the title says it already
        await self._send(status, headers=headers, **fields)

    async def finish(self) -> None:
        """The application returned: send a held 5xx response (completed or not); log an
        exception its framework caught and rendered itself (``report_exception``)."""
        if self.held_start is not None:
            await self._send_rewritten()
        context = self.context
        reported = context.reported_exception
        if (
            isinstance(reported, Exception)
            and context.exception_logged is not reported
            and (context.status or 500) >= 500  # mapped to a 4xx by the app's own handler: no fault
        ):
            context.keep_exception(reported)
            self._log(reported, "rendered by the application's framework")
            await self._report()
        logged = context.exception_logged
        if isinstance(logged, Exception) and (context.status or 500) >= 500:
            # An inner error layer answered for it (and logged it): report it from here if
            # that layer had no hook.
            self.unreported = logged
            await self._report()

    async def fail(self, exc: Exception) -> bool:
        """Answer for ``exc``; ``False`` when it must propagate (the response is half sent)."""
        context = self.context
        if _is_client_disconnect(exc):
            # The client went away (an upload it abandoned): no fault of ours, and no one to
            # answer. Nothing is invented: the status stays what was sent, if anything.
            context.mark_disconnected()
            self.held_start = None
            return True
        already_logged = context.exception_logged is exc
        context.replace_exception(exc)
        if self.started:
            if not already_logged:
                self._log(exc, "after the response started")
            self.unreported = exc
            if self.completed:  # a failing background task: the client has its response
                await self._report()
                return True
            # Half sent: only the server can end it, by closing the connection once the
            # exception reaches it; the reporter must not hold the client until then.
            from .lifespan._detached import Detached

            Detached.start(self._report, name="asgi_resilience on_error")
            return False
        self.held_start = None
        status, fields = describe_exception(exc)
        if status >= 500 and not isinstance(exc, (AppError, CircuitOpenError)):
            if not already_logged:
                self._log(exc, "")
            self.unreported = exc  # an inner error layer may have logged it: report it here
            fields.setdefault("exception", exc)
        elif status >= 500:
            self.middleware.logger.warning(
                "%s answered %d: %s", type(exc).__name__, status, exc, extra=self._extra()
            )
        try:
            await self._send(status, **fields)
        finally:  # the client gone or not, the reporter hears of it
            await self._report()
        return True

    async def _send(self, status: int, **fields: Any) -> None:
        self.started = self.completed = True
        await send_error(self.context, self.scope, self.send_downstream, status, **fields)

    def _log(self, exc: Exception, when: str) -> None:
        self.context.mark_logged(exc)
        self.unreported = exc
        self.middleware.logger.error(
            "Unhandled %s in %s %s%s",
            type(exc).__name__,
            self.scope.get("method"),
            self.scope.get("path"),
            f" ({when})" if when else "",
            exc_info=exc,
            extra=self._extra(),
        )

    async def _report(self) -> None:
        """Hand the exception just logged to ``on_error``; its own failure is logged, never
        raised (the response is the one the client was going to get)."""
        exc, self.unreported = self.unreported, None
        on_error = self.middleware.on_error
        context = self.context
        if exc is None or on_error is None or context.exception_reported is exc:
            return
        context.exception_reported = exc
        try:
            outcome = on_error(exc, self.context)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            self.middleware.logger.exception(
                "on_error %r failed while reporting %s",
                on_error,
                type(exc).__name__,
                extra=self._extra(),
            )

    def _extra(self) -> dict[str, Any]:
        return {"request_id": self.context.request_id}


def _is_client_disconnect(exc: Exception) -> bool:
    """Starlette's ``ClientDisconnect``: the request body was being read when the client left
    (looked up, not imported: the error layer works without Starlette's request module)."""
    module = sys.modules.get("starlette.requests")
    disconnect = getattr(module, "ClientDisconnect", None)
    return disconnect is not None and isinstance(exc, disconnect)
