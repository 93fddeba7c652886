"""asgi_resilience: production-ready ASGI services in one line.

``resilient(app)`` wraps any ASGI application in a lifespan (startup checks, resources,
draining), request ids, an access log, error normalization, health endpoints and (optionally)
response envelopes; each middleware also works alone.
"""

from __future__ import annotations

from .access_log import AccessLogMiddleware, JsonFormatter, JsonLinesSink
from .circuit_breaker import CircuitBreaker, Retry, retry
from .config import ConfigurationError
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
    MissingExtra,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnprocessableEntity,
)
from .health import HealthApp
from .lifespan import (
    Check,
    CheckResult,
    Lifespan,
    LifespanMiddleware,
    ResourceReport,
    StartupError,
)
from .metrics import Metrics, MetricsMiddleware, metrics_app
from .overload import (
    AdaptiveLimit,
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    LoopLag,
    TimeoutMiddleware,
    get_deadline,
    remaining_time,
)
from .proxies import TrustedProxies
from .ratelimit import (
    Backend,
    BackendError,
    MemoryBackend,
    Rate,
    RateLimitMiddleware,
    parse_rates,
)
from .request_id import (
    RequestIdLogFilter,
    RequestIdMiddleware,
    generate_request_id,
    get_request_id,
)
from .stack import BuiltinEndpoints, ResilientApp, resilient
from .tracing import TracingMiddleware
from .websockets import WebSocketMiddleware

__version__ = "0.1.0"

__all__ = [
    "AccessLogMiddleware",
    "AdaptiveLimit",
    "AppError",
    "AsgiResilienceError",
    "Backend",
    "BackendError",
    "BadRequest",
    "BodyLimitMiddleware",
    "BuiltinEndpoints",
    "Check",
    "CheckResult",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConcurrencyLimitMiddleware",
    "ConfigurationError",
    "Conflict",
    "EnvelopeMiddleware",
    "ErrorMiddleware",
    "Forbidden",
    "HealthApp",
    "JsonFormatter",
    "JsonLinesSink",
    "Lifespan",
    "LifespanMiddleware",
    "LoopLag",
    "MemoryBackend",
    "Metrics",
    "MetricsMiddleware",
    "MissingExtra",
    "NotFound",
    "Rate",
    "RateLimitMiddleware",
    "RequestContext",
    "RequestIdLogFilter",
    "RequestIdMiddleware",
    "ResilientApp",
    "ResourceReport",
    "Retry",
    "ServiceUnavailable",
    "StartupError",
    "TimeoutMiddleware",
    "TooManyRequests",
    "TracingMiddleware",
    "TrustedProxies",
    "Unauthorized",
    "UnprocessableEntity",
    "WebSocketMiddleware",
    "__version__",
    "add_envelope_meta",
    "generate_request_id",
    "get_deadline",
    "get_request_id",
    "metrics_app",
    "parse_rates",
    "remaining_time",
    "render_error",
    "resilient",
    "retry",
    "skip_envelope",
]
