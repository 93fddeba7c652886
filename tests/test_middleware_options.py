"""Every middleware refuses a wrong option value with a ValueError that names the option."""

from __future__ import annotations

from typing import Any

import pytest

from asgi_resilience import (
    AccessLogMiddleware,
    EnvelopeMiddleware,
    ErrorMiddleware,
    LifespanMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
    TracingMiddleware,
)
from asgi_resilience.overload import (
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    TimeoutMiddleware,
)
from asgi_resilience.ratelimit import RateLimitMiddleware
from asgi_resilience.types import Receive, Scope, Send


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    pass


LIMIT = {"limit": "5/second"}
WRONG: list[tuple[type, dict[str, Any], str]] = [
    (RequestIdMiddleware, {"header_name": 5}, "header_name"),
    (RequestIdMiddleware, {"header_name": "X Request"}, "header_name"),
    (RequestIdMiddleware, {"trust_incoming": "yes"}, "trust_incoming"),
    (RequestIdMiddleware, {"generator": "uuid4"}, "generator"),
    (RequestIdMiddleware, {"logger": "app"}, "logger"),
    (RequestIdMiddleware, {"on_invalid": "drop"}, "on_invalid"),
    (AccessLogMiddleware, {"logger": "app"}, "logger"),
    (AccessLogMiddleware, {"include_query": "no"}, "include_query"),
    (AccessLogMiddleware, {"exclude_paths": "/health"}, "exclude_paths"),
    (AccessLogMiddleware, {"slow_threshold": "1s"}, "slow_threshold"),
    (AccessLogMiddleware, {"trusted_proxies": ["everyone"]}, "trusted_proxies"),
    (AccessLogMiddleware, {"sink": "stdout"}, "sink"),
    (ErrorMiddleware, {"debug": "no"}, "debug"),
    (ErrorMiddleware, {"format": "html"}, "format"),
    (ErrorMiddleware, {"rewrite_responses": "no"}, "rewrite_responses"),
    (ErrorMiddleware, {"max_body_size": "64k"}, "max_body_size"),
    (ErrorMiddleware, {"max_body_size": True}, "max_body_size"),
    (ErrorMiddleware, {"logger": 5}, "logger"),
    (EnvelopeMiddleware, {"exclude_paths": "/x"}, "exclude_paths"),
    (MetricsMiddleware, {"registry": {}}, "registry"),
    (MetricsMiddleware, {"exclude_paths": ["metrics"]}, "exclude_paths"),
    (TracingMiddleware, {"tracer_provider": "otel"}, "tracer_provider"),
    (TracingMiddleware, {"include_query": 1}, "include_query"),
    (RateLimitMiddleware, {"limit": 5}, "limit"),
    (RateLimitMiddleware, {**LIMIT, "backend_timeout": "1"}, "backend_timeout"),
    (RateLimitMiddleware, {**LIMIT, "on_backend_error": "retry"}, "on_backend_error"),
    (RateLimitMiddleware, {**LIMIT, "registry": {}}, "registry"),
    (RateLimitMiddleware, {**LIMIT, "cost": "1"}, "cost"),
    (RateLimitMiddleware, {**LIMIT, "routes": ["/a"]}, "routes"),
    (RateLimitMiddleware, {**LIMIT, "ipv6_prefix": 200}, "ipv6_prefix"),
    (ConcurrencyLimitMiddleware, {"limit": "8"}, "limit"),
    (ConcurrencyLimitMiddleware, {"limit": 8, "max_queue": 1.5}, "max_queue"),
    (ConcurrencyLimitMiddleware, {"limit": 8, "queue_timeout": "1"}, "queue_timeout"),
    (TimeoutMiddleware, {"timeout": "5"}, "timeout"),
    (TimeoutMiddleware, {"timeout": 5, "routes": ["/x"]}, "routes"),
    (BodyLimitMiddleware, {"max_body_size": "1mb"}, "max_body_size"),
    (BodyLimitMiddleware, {"max_body_size": 10, "routes": 5}, "routes"),
    (LifespanMiddleware, {"lifespan": "app"}, "lifespan"),
]


@pytest.mark.parametrize(
    ("middleware", "options", "option"),
    WRONG,
    ids=[f"{m.__name__}-{o}" for m, _, o in WRONG],
)
def test_a_wrong_value_is_a_value_error_naming_the_option(
    middleware: type, options: dict[str, Any], option: str
) -> None:
    with pytest.raises(ValueError, match=option):
        middleware(app, **options)
