"""``resilient(app)``: the whole stack around an ASGI application, in the right order."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Literal

from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from .access_log import DEFAULT_EXCLUDE_PATHS, AccessLogMiddleware
from .envelope import EnvelopeMiddleware
from .errors import ErrorMiddleware
from .health import HealthApp
from .lifespan import Lifespan, LifespanMiddleware
from .metrics import MetricsMiddleware, metrics_app
from .proxies import TrustedProxies
from .ratelimit import (
    Backend,
    KeyFunction,
    RateLimitMiddleware,
    StrategyName,
    backend_from_url,
)
from .request_id import RequestIdMiddleware
from .tracing import TracingMiddleware
from .types import ASGIApp, Receive, Scope, Send

__all__ = ["BuiltinEndpoints", "ResilientApp", "resilient"]


class ResilientApp:
    """The ASGI application ``resilient()`` returns.

    Attributes:
        app: the application that was wrapped.
        stack: the outermost layer of the middleware stack.
        lifespan: the lifespan the stack runs (checks, resources, draining).
        health: the health endpoints, if mounted.
    """

    def __init__(
        self, app: ASGIApp, stack: ASGIApp, lifespan: Lifespan, health: HealthApp | None
    ) -> None:
        self.app = app
        self.stack = stack
        self.lifespan = lifespan
        self.health = health

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
    lifespan: Lifespan | None = None,
    health_path: str | None = "/health",
    health_status_details: bool = False,
    health_cache_ttl: float = 1.0,
    version: str | None = None,
    rate_limit: str | None = None,
    rate_limit_backend: str | Backend = "memory://",
    rate_limit_strategy: StrategyName = "gcra",
    rate_limit_key: str | KeyFunction = "ip",
    rate_limit_routes: Mapping[str, str] | None = None,
    rate_limit_exempt_paths: Iterable[str] = (),
    rate_limit_on_backend_error: Literal["allow", "deny"] = "allow",
    rate_limit_backend_timeout: float = 0.05,
    trusted_proxies: Iterable[str] = (),
    metrics: bool = True,
    metrics_path: str | None = "/metrics",
    registry: CollectorRegistry | None = None,
    tracing: bool = True,
    tracer_provider: TracerProvider | None = None,
) -> ResilientApp:
    """Wrap ``app`` in the asgi_resilience stack and return the new ASGI application.

    Layers, outermost first: the lifespan (checks, resources, draining; the app's own lifespan
    kept), request ids, tracing, metrics, access log, error normalization, the built-in
    endpoints (``/metrics``, health), rate limits (only with ``rate_limit``), envelopes (only
    when ``envelope=True``), then ``app``. Errors
    take the envelope shape when envelopes are on, the RFC 9457 problem shape otherwise.
    WebSocket scopes pass through every layer.

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
        lifespan: a ``Lifespan`` with your checks and resources; a bare one by default (it
            still drains on SIGTERM). Do not also give it to your framework.
        health_path: where the health endpoints live (``None``: not mounted).
        health_status_details: serve ``<health_path>/status``.
        health_cache_ttl: seconds readiness check results are reused.
        version: your service's version, shown in the status endpoint.
        rate_limit: the default limit (``"100/minute"``, ``"10/second;1000/hour"``); ``None``:
            no limiting.
        rate_limit_backend: ``"memory://"``, ``"redis://host:6379/0"`` or a ``Backend``; one
            made from a URL is closed at shutdown.
        rate_limit_strategy: ``"gcra"``, ``"fixed-window"`` or ``"sliding-window"``.
        rate_limit_key: ``"ip"``, ``"user"``, ``"header:<name>"`` or a callable.
        rate_limit_routes: route template or path prefix -> limit.
        rate_limit_exempt_paths: paths never limited.
        rate_limit_on_backend_error: ``"allow"`` or ``"deny"`` (503) when the backend fails.
        rate_limit_backend_timeout: seconds a rate limit decision may take.
        trusted_proxies: proxy addresses/networks whose forwarding headers name the client,
            for the rate limiter and the access log alike.
        metrics: record Prometheus request metrics.
        metrics_path: where the metrics are served (``None``: not served).
        registry: the Prometheus registry for every metric of the stack (the global one by
            default; inject one per test).
        tracing: open an OpenTelemetry SERVER span per request (a pass-through without SDK).
        tracer_provider: the provider for those spans (the global one by default).

    Raises:
        ValueError: an option is invalid, or ``app`` is already wrapped.
    """
    if isinstance(app, ResilientApp):
        raise ValueError("app is already wrapped by resilient(); wrap the original app once")
    lifespan = lifespan if lifespan is not None else Lifespan(registry=registry)
    if lifespan.registry is None:
        lifespan.registry = registry
    proxies = TrustedProxies(trusted_proxies)
    stack: ASGIApp = app
    if envelope:
        stack = EnvelopeMiddleware(stack, exclude_paths=envelope_exclude_paths)
    if rate_limit is not None:
        backend = rate_limit_backend
        if isinstance(backend, str):
            backend = backend_from_url(backend)
            lifespan.add_resource("rate-limit-backend", backend.aclose, timeout=2)
        stack = RateLimitMiddleware(
            stack,
            limit=rate_limit,
            strategy=rate_limit_strategy,
            backend=backend,
            key=rate_limit_key,
            trusted_proxies=proxies,
            routes=rate_limit_routes,
            exempt_paths=rate_limit_exempt_paths,
            on_backend_error=rate_limit_on_backend_error,
            backend_timeout=rate_limit_backend_timeout,
            registry=registry,
        )
    endpoints: dict[str, ASGIApp] = {}
    health = None
    if health_path is not None:
        health = HealthApp(
            lifespan,
            path=health_path,
            cache_ttl=health_cache_ttl,
            status_details=health_status_details,
            version=version,
        )
        endpoints.update(dict.fromkeys(health.paths, health))
    if metrics_path is not None:
        endpoints[metrics_path] = metrics_app(registry)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            lifespan.add_resource("prometheus-multiprocess", _mark_process_dead, timeout=2)
    if endpoints:
        stack = BuiltinEndpoints(stack, endpoints=endpoints)
    if errors:
        stack = ErrorMiddleware(stack, debug=debug, format="envelope" if envelope else "problem")
    if access_log:
        stack = AccessLogMiddleware(
            stack,
            logger=access_logger,
            exclude_paths=access_log_exclude_paths,
            slow_threshold=slow_threshold,
            trusted_proxies=proxies,
        )
    if metrics:
        excluded = [p for p in (metrics_path, health_path, "/livez", "/readyz") if p]
        stack = MetricsMiddleware(stack, registry=registry, exclude_paths=excluded)
    if tracing:
        stack = TracingMiddleware(stack, tracer_provider=tracer_provider)
    if request_ids:
        stack = RequestIdMiddleware(
            stack, header_name=request_id_header, trust_incoming=trust_incoming_request_id
        )
    stack = LifespanMiddleware(stack, lifespan=lifespan)
    return ResilientApp(app, stack, lifespan, health)


def _mark_process_dead() -> None:
    """Tell prometheus_client's multiprocess mode this worker is gone (its live gauges too)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


class BuiltinEndpoints:
    """Answer a fixed set of paths (health, metrics) with their own apps; pass the rest on.

    An exact path lookup per request, nothing matched twice. Handles ``http`` scopes; others
    pass through. In the stack it sits inside ``ErrorMiddleware`` and outside rate limits and
    envelopes, so probes and scrapes are never limited or enveloped.

    Args:
        app: the application behind the endpoints.
        endpoints: path -> ASGI app answering it.
    """

    def __init__(self, app: ASGIApp, *, endpoints: dict[str, ASGIApp]) -> None:
        self.app = app
        self.endpoints = dict(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)
