"""asgi_resilience: production-ready ASGI services in one line.

``resilient(app)`` wraps any ASGI application in request ids, an access log, error
normalization and (optionally) response envelopes; each middleware also works alone.
"""

from __future__ import annotations

from .access_log import AccessLogMiddleware, JsonFormatter
from .context import RequestContext
from .envelope import EnvelopeMiddleware, add_envelope_meta, skip_envelope
from .errors import ErrorMiddleware, render_error
from .exceptions import (
    AppError,
    AsgiResilienceError,
    BadRequest,
    CircuitOpenError,
    Conflict,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnprocessableEntity,
)
from .request_id import (
    RequestIdLogFilter,
    RequestIdMiddleware,
    generate_request_id,
    get_request_id,
)
from .stack import ResilientApp, resilient

__version__ = "0.1.0"

__all__ = [
    "AccessLogMiddleware",
    "AppError",
    "AsgiResilienceError",
    "BadRequest",
    "CircuitOpenError",
    "Conflict",
    "EnvelopeMiddleware",
    "ErrorMiddleware",
    "Forbidden",
    "JsonFormatter",
    "NotFound",
    "RequestContext",
    "RequestIdLogFilter",
    "RequestIdMiddleware",
    "ResilientApp",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UnprocessableEntity",
    "__version__",
    "add_envelope_meta",
    "generate_request_id",
    "get_request_id",
    "render_error",
    "resilient",
    "skip_envelope",
]
