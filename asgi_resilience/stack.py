"""``resilient(app)``: the whole stack around an ASGI application, in the right order."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .access_log import DEFAULT_EXCLUDE_PATHS, AccessLogMiddleware
from .envelope import EnvelopeMiddleware
from .errors import ErrorMiddleware
from .request_id import RequestIdMiddleware
from .types import ASGIApp, Receive, Scope, Send

__all__ = ["ResilientApp", "resilient"]


class ResilientApp:
    """The ASGI application ``resilient()`` returns.

    Attributes:
        app: the application that was wrapped.
        stack: the outermost layer of the middleware stack.
    """

    def __init__(self, app: ASGIApp, stack: ASGIApp) -> None:
        self.app = app
        self.stack = stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stack(scope, receive, send)


def resilient(
    app: ASGIApp,
    *,
    debug: bool | None = None,
    envelope: bool = False,
    request_ids: bool = True,
    request_id_header: str = "X-Request-ID",
    trust_incoming_request_id: bool = True,
    access_log: bool = True,
    access_logger: logging.Logger | None = None,
    access_log_exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
    slow_threshold: float = 1.0,
    errors: bool = True,
    envelope_exclude_paths: Iterable[str] = (),
) -> ResilientApp:
    """Wrap ``app`` in the asgi_resilience stack and return the new ASGI application.

    Layers, outermost first: request ids, access log, error normalization, envelopes (only when
    ``envelope=True``), then ``app``. Errors take the envelope shape when envelopes are on, the
    RFC 9457 problem shape otherwise. Every layer passes WebSocket and lifespan scopes through,
    so the wrapped app's own lifespan keeps working.

    Args:
        app: any ASGI application (Starlette, FastAPI, a raw callable...).
        debug: show exception details in 500 bodies; ``None`` reads ``APP_ENV``/``ENVIRONMENT``.
        envelope: wrap successful JSON bodies in ``{"success", "data", "meta"}``.
        request_ids: read, generate and echo request ids.
        request_id_header: the header carrying them.
        trust_incoming_request_id: keep a valid id sent by the client or a proxy.
        access_log: log one record per request (``asgi_resilience.access``).
        access_logger: log there instead.
        access_log_exclude_paths: paths not logged (probes and scrapes by default).
        slow_threshold: seconds after which a request is logged as a warning.
        errors: normalize errors into JSON bodies.
        envelope_exclude_paths: paths whose responses are never enveloped.

    Raises:
        ValueError: an option is invalid, or ``app`` is already wrapped.
    """
    if isinstance(app, ResilientApp):
        raise ValueError("app is already wrapped by resilient(); wrap the original app once")
    stack: ASGIApp = app
    if envelope:
        stack = EnvelopeMiddleware(stack, exclude_paths=envelope_exclude_paths)
    if errors:
        stack = ErrorMiddleware(stack, debug=debug, format="envelope" if envelope else "problem")
    if access_log:
        stack = AccessLogMiddleware(
            stack,
            logger=access_logger,
            exclude_paths=access_log_exclude_paths,
            slow_threshold=slow_threshold,
        )
    if request_ids:
        stack = RequestIdMiddleware(
            stack, header_name=request_id_header, trust_incoming=trust_incoming_request_id
        )
    return ResilientApp(app, stack)
