"""Rate limiting: strategies over storage backends, and the middleware that applies them.

``RedisBackend`` lives in ``asgi_resilience.ratelimit.redis`` (the ``redis`` extra).
"""

from __future__ import annotations

from .backends import Backend, BackendError, MemoryBackend, backend_from_url
from .middleware import KeyFunction, RateLimitMiddleware
from .rates import Rate, parse_rates
from .strategies import (
    GCRA,
    Decision,
    FixedWindow,
    RateStatus,
    SlidingWindow,
    Strategy,
    StrategyName,
    strategy_for,
)

__all__ = [
    "GCRA",
    "Backend",
    "BackendError",
    "Decision",
    "FixedWindow",
    "KeyFunction",
    "MemoryBackend",
    "Rate",
    "RateLimitMiddleware",
    "RateStatus",
    "SlidingWindow",
    "Strategy",
    "StrategyName",
    "backend_from_url",
    "parse_rates",
    "strategy_for",
]
