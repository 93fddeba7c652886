"""Request IDs: read, validate or generate ``X-Request-ID``, echo it, expose it to code and logs."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any, Literal

from opentelemetry import trace

from ._checks import check_bool, check_callable, check_logger
from ._http import HEADER_NAME_BYTES, first_header
from .context import ErrorFormat, RequestContext
from .observe import REPLY, Observer
from .problems import send_error
from .types import ASGIApp, Scope, Send

__all__ = ["RequestIdLogFilter", "RequestIdMiddleware", "generate_request_id", "get_request_id"]

_logger = logging.getLogger("asgi_resilience.request_id")

# 1-128 visible ASCII characters: what proxies (nginx $request_id, Envoy, AWS ALB) send, and
# nothing that could split a header or a log line.
_VALID_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_ESCAPED_PREFIX = 64


def generate_request_id() -> str:
    """32 lowercase hex characters from 16 random bytes (the form of nginx's ``$request_id``)."""
    return os.urandom(16).hex()


def get_request_id() -> str | None:
    """The id of the request the current task is handling, or ``None`` outside a request."""
    context = RequestContext.current()
    return context.request_id if context is not None else None


class RequestIdMiddleware(Observer):
    """Give every HTTP request an id, echo it on the response and expose it inside the request.

    Handles ``http`` scopes; WebSocket and lifespan pass through. Reads ``header_name`` from the
    request: a value of 1-128 visible ASCII characters (0x21-0x7E: nginx ids, UUIDs, ULIDs) is
    kept; anything else is replaced by a fresh id and a warning logged with the value escaped (or,
    with ``on_invalid="reject"``, answered with a 400 error). Writes the same header on every
    response, error responses produced below included. The id is in the request context, in
    ``scope["state"]["request_id"]`` (``request.state.request_id``) and in ``get_request_id()``.
    Put it outermost, so that every other layer and every log line sees the id. Under another
    ``RequestIdMiddleware`` it keeps the id the outer one decided and echoes it in its header.

    Args:
        app: the ASGI application.
        header_name: the request and response header carrying the id.
        trust_incoming: keep a valid incoming id; ``False`` always generates one.
        on_invalid: ``"replace"`` an invalid incoming id, or ``"reject"`` the request with 400.
        generator: makes new ids; must return 1-128 visible ASCII characters (a failing or
            misbehaving generator is replaced by the default one, with an error logged).
        logger: where invalid ids are reported (``asgi_resilience.request_id``).
        error_format: the shape of the 400 (``"problem"`` or ``"envelope"``): this layer
            answers before ``ErrorMiddleware`` has chosen one.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        header_name: str = "X-Request-ID",
        trust_incoming: bool = True,
        on_invalid: Literal["replace", "reject"] = "replace",
        generator: Callable[[], str] | None = None,
        logger: logging.Logger | None = None,
        error_format: ErrorFormat = "problem",
    ) -> None:
        if not isinstance(header_name, str):
            raise ValueError(
                f"header_name must be a header name such as X-Request-ID, got {header_name!r}"
            )
        check_bool("trust_incoming", trust_incoming)
        check_callable("generator", generator)
        check_logger("logger", logger)
        if on_invalid not in ("replace", "reject"):
            raise ValueError(f"on_invalid must be 'replace' or 'reject', got {on_invalid!r}")
        try:
            self.header_name = header_name.strip().lower().encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"header_name must be ASCII, got {header_name!r}") from None
        if not HEADER_NAME_BYTES.fullmatch(self.header_name):
            raise ValueError(f"header_name must be a valid HTTP header name, got {header_name!r}")
        self.app = app
        self.trust_incoming = trust_incoming
        self.reject_invalid = on_invalid == "reject"
        self.generator = generator
        self.logger = logger if logger is not None else _logger
        if error_format not in ("problem", "envelope"):
            raise ValueError(f"error_format must be 'problem' or 'envelope', got {error_format!r}")
        self.error_format: ErrorFormat = error_format

    def enter(self, context: RequestContext, scope: Scope) -> Any:
        if context.request_id is not None:
            # An outer id layer decided already (one id per request): echo it here too.
            request_id: str | bytes | None = context.request_id
        else:
            request_id = self._incoming(scope) if self.trust_incoming else None
        if request_id is None:
            request_id = self._generate()
        elif isinstance(request_id, bytes):
            invalid, request_id = request_id, self._generate()
            action = "rejected the request" if self.reject_invalid else "generated a new id"
            self.logger.warning(
                "Invalid %s header %s (%d bytes): %s",
                self.header_name.decode(),
                _escape(invalid),
                len(invalid),
                action,
                extra={"request_id": request_id},
            )
            if self.reject_invalid:
                context.request_id = request_id
                context.add_response_headers(
                    [(self.header_name, request_id.encode())], replace=self.header_name
                )
                return REPLY  # answered by reply(): a 400, measured and logged as any other
        context.request_id = request_id
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["request_id"] = request_id
        # Written by the request's one recording send, replacing any id header the app set.
        context.add_response_headers(
            [(self.header_name, request_id.encode())], replace=self.header_name
        )
        return None

    def _incoming(self, scope: Scope) -> str | bytes | None:
        """The incoming id if valid, the raw value if invalid, ``None`` if absent."""
        value = first_header(scope["headers"], self.header_name)
        if value is None:
            return None
        return value.decode("ascii") if _VALID_ID.fullmatch(value) else bytes(value)

    async def reply(self, context: RequestContext, scope: Scope, send: Send) -> None:
        """The 400 for an invalid incoming id (``on_invalid="reject"``)."""
        await send_error(
            context,
            scope,
            send,
            400,
            detail=f"Invalid {self.header_name.decode()} header",
            error_format=self.error_format,
        )

    def _generate(self) -> str:
        if self.generator is None:
            return generate_request_id()
        try:
            request_id = self.generator()
            if isinstance(request_id, str) and _VALID_ID.fullmatch(request_id.encode("latin-1")):
                return request_id
            self.logger.error("Request id generator returned an invalid id: %r", request_id)
        except Exception:
            self.logger.exception("Request id generator failed")
        return generate_request_id()


class RequestIdLogFilter(logging.Filter):
    """Put the current ``request_id`` (and ``trace_id``/``span_id``) on every log record.

    Attach it to a handler (``handler.addFilter(RequestIdLogFilter())``) so formatters can use
    ``%(request_id)s``. ``request_id`` is always set (``default`` outside a request); ``trace_id``
    and ``span_id`` (lowercase hex, W3C form) only when the current context has a valid
    OpenTelemetry span. A value the record already carries (``extra=``) is left alone.

    Args:
        name: as ``logging.Filter``: only records of this logger and its children pass.
        default: the ``request_id`` of records logged outside any request.
    """

    def __init__(self, name: str = "", *, default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        if not super().filter(record):
            return False
        if getattr(record, "request_id", None) is None:
            record.request_id = get_request_id() or self.default
        if not hasattr(record, "trace_id"):
            ids = current_span_ids()
            if ids is not None:
                record.trace_id, record.span_id = ids
        return True


def current_span_ids() -> tuple[str, str] | None:
    """The current span's ``(trace_id, span_id)`` in lowercase hex (W3C form), ``None`` without
    a valid span: what log records are correlated with."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


def _escape(value: bytes) -> str:
    """A log-safe rendering of an untrusted header value: escaped, and cut to a short prefix."""
    shown = value[:_ESCAPED_PREFIX].decode("latin-1").encode("unicode_escape").decode("ascii")
    shown = shown.replace('"', '\\"')
    return f'"{shown}"' + ("..." if len(value) > _ESCAPED_PREFIX else "")
