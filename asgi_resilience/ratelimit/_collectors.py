"""The rate limiter's Prometheus collectors."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from ..metrics import collectors

__all__ = ["RateLimitCollectors"]


@collectors
class RateLimitCollectors:
    """One counter of decisions, by policy and outcome (``allowed``, ``limited``, ``error``)."""

    def __init__(self, registry: CollectorRegistry, request_path: Any) -> None:
        self.rate_limit_decisions = request_path.Counter(
            "asgi_resilience_rate_limit_decisions",
            "Rate limit decisions.",
            ["policy", "outcome"],
            registry=registry,
        )
