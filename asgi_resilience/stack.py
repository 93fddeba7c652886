"""``resilient(app)``: the whole stack around an ASGI application, in the right order."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from .access_log import DEFAULT_EXCLUDE_PATHS, AccessLogMiddleware, JsonLinesSink
from .config import ConfigurationError, options_from_env
from .envelope import EnvelopeMiddleware
from .errors import ErrorMiddleware, default_debug
from .health import HealthApp
from .lifespan import Lifespan
from .lifespan_middleware import LifespanMiddleware
from .metrics import MetricsMiddleware, metrics_app
from .observe import Observer, Observers
from .overload import BodyLimitMiddleware, ConcurrencyLimitMiddleware, TimeoutMiddleware
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

__all__ = ["DEFAULT", "BuiltinEndpoints", "ResilientApp", "resilient"]


class _Default:
    """Marks an option not given: the environment, then the documented default, decide."""

    def __repr__(self) -> str:
        return "<default>"


DEFAULT: Any = _Default()


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


# Options that are on or off, and those that only shape a rate limit.
_SWITCHES = (
    "envelope",
    "request_ids",
    "trust_incoming_request_id",
    "access_log",
    "errors",
    "health_status_details",
    "metrics",
    "tracing",
)
_RATE_LIMIT_OPTIONS = (
    "rate_limit_backend",
    "rate_limit_strategy",
    "rate_limit_key",
    "rate_limit_routes",
    "rate_limit_exempt_paths",
    "rate_limit_on_backend_error",
    "rate_limit_backend_timeout",
)
_DEFAULTS: dict[str, Any] = {
    "debug": None,
    "envelope": False,
    "request_ids": True,
    "request_id_header": "X-Request-ID",
    "trust_incoming_request_id": True,
    "access_log": True,
    "access_log_exclude_paths": DEFAULT_EXCLUDE_PATHS,
    "slow_threshold": 1.0,
    "errors": True,
    "envelope_exclude_paths": (),
    "health_path": "/health",
    "health_status_details": False,
    "health_cache_ttl": 1.0,
    "version": None,
    "rate_limit": None,
    "rate_limit_backend": "memory://",
    "rate_limit_strategy": "gcra",
    "rate_limit_key": "ip",
    "rate_limit_exempt_paths": (),
    "rate_limit_on_backend_error": "allow",
    "rate_limit_backend_timeout": 0.05,
    "trusted_proxies": (),
    "forwarded_header": "x-forwarded-for",
    "metrics": True,
    "metrics_path": "/metrics",
    "tracing": True,
    "max_concurrency": None,
    "max_queue": None,
    "queue_timeout": 1.0,
    "max_lag": 0.1,
    "timeout": None,
    "max_body_size": None,
}


def resilient(
    app: ASGIApp,
    *,
    debug: bool | None = DEFAULT,
    envelope: bool = DEFAULT,
    request_ids: bool = DEFAULT,
    request_id_header: str = DEFAULT,
    trust_incoming_request_id: bool = DEFAULT,
    access_log: bool = DEFAULT,
    access_logger: logging.Logger | None = None,
    access_log_sink: JsonLinesSink | None = None,
    access_log_exclude_paths: Iterable[str] = DEFAULT,
    slow_threshold: float = DEFAULT,
    errors: bool = DEFAULT,
    envelope_exclude_paths: Iterable[str] = DEFAULT,
    lifespan: Lifespan | None = None,
    health_path: str | None = DEFAULT,
    health_status_details: bool = DEFAULT,
    health_cache_ttl: float = DEFAULT,
    version: str | None = DEFAULT,
    rate_limit: str | None = DEFAULT,
    rate_limit_backend: str | Backend = DEFAULT,
    rate_limit_strategy: StrategyName = DEFAULT,
    rate_limit_key: str | KeyFunction = DEFAULT,
    rate_limit_routes: Mapping[str, str] | None = None,
    rate_limit_exempt_paths: Iterable[str] = DEFAULT,
    rate_limit_on_backend_error: Literal["allow", "deny"] = DEFAULT,
    rate_limit_backend_timeout: float = DEFAULT,
    trusted_proxies: Iterable[str] = DEFAULT,
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = DEFAULT,
    metrics: bool = DEFAULT,
    metrics_path: str | None = DEFAULT,
    registry: CollectorRegistry | None = None,
    tracing: bool = DEFAULT,
    tracer_provider: TracerProvider | None = None,
    max_concurrency: int | Literal["adaptive"] | None = DEFAULT,
    max_queue: int | None = DEFAULT,
    queue_timeout: float = DEFAULT,
    max_lag: float | None = DEFAULT,
    timeout: float | None = DEFAULT,
    timeout_routes: Mapping[str, float | None] | None = None,
    max_body_size: int | None = DEFAULT,
    body_limit_routes: Mapping[str, int | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ResilientApp:
    """Wrap ``app`` in the asgi_resilience stack and return the new ASGI application.

    Layers, outermost first: the lifespan (checks, resources, draining; the app's own lifespan
    kept), request ids, tracing, metrics, access log, error normalization, the built-in
    endpoints (``/metrics``, health), rate limits (only with ``rate_limit``), envelopes (only
    when ``envelope=True``), then ``app``. Errors take the envelope shape when envelopes are
    on, the RFC 9457 problem shape otherwise. WebSocket scopes pass through every layer.

    Every option that is a plain value can also come from the environment:
    ``ASGI_RESILIENCE_<OPTION>`` (``ASGI_RESILIENCE_RATE_LIMIT=100/minute``); see
    ``asgi_resilience.config``. The defaults below apply when neither gives a value.

    Args:
        app: any ASGI application (Starlette, FastAPI, a raw callable...).
        debug: show exception details in 500 bodies; ``None`` reads ``APP_ENV``/``ENVIRONMENT``.
        envelope: wrap successful JSON bodies in ``{"success", "data", "meta"}``.
        request_ids: read, generate and echo request ids.
        request_id_header: the header carrying them.
        trust_incoming_request_id: keep a valid id sent by the client or a proxy.
        access_log: log one record per request (``asgi_resilience.access``).
        access_logger: log there instead.
        access_log_sink: write the access log's JSON lines to this ``JsonLinesSink`` instead
            of ``logging`` (flushed when the lifespan shuts down).
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
            for the rate limiter, the access log and the span alike.
        forwarded_header: the header those proxies write: ``"x-forwarded-for"`` or
            ``"forwarded"``; the other is ignored (a client could have sent it).
        metrics: record Prometheus request metrics.
        metrics_path: where the metrics are served (``None``: not served).
        registry: the Prometheus registry for every metric of the stack (the global one by
            default; inject one per test).
        tracing: open an OpenTelemetry SERVER span per request (a pass-through without SDK).
        tracer_provider: the provider for those spans (the global one by default).
        max_concurrency: requests inside the app at once (a number, or ``"adaptive"``), with
            load shedding (``ConcurrencyLimitMiddleware``); ``None``: no limit.
        max_queue: requests that may wait for a place (default: the limit); needs
            ``max_concurrency``.
        queue_timeout: seconds a request may wait for a place.
        max_lag: shed at once while the event loop runs more than this many seconds behind
            (the wait before the stack sees a request); ``None``: never; needs
            ``max_concurrency``.
        timeout: seconds a request may take before it is cancelled and answered 504
            (``TimeoutMiddleware``); ``None``: no deadline.
        timeout_routes: route template or path prefix -> seconds (``None``: no deadline).
        max_body_size: bytes a request body may have, 413 beyond (``BodyLimitMiddleware``);
            ``None``: no limit.
        body_limit_routes: route template or path prefix -> bytes (``None``: no limit).
        environ: where ``ASGI_RESILIENCE_<OPTION>`` variables and ``APP_ENV``/``ENVIRONMENT``
            are read (``os.environ`` by default; ``{}`` to ignore the environment). Keyword
            arguments win over them. (``PROMETHEUS_MULTIPROC_DIR`` is always read from
            ``os.environ``, as prometheus_client itself reads it.)

    Raises:
        ValueError: an option is invalid, or ``app`` is already wrapped.
        ConfigurationError: an environment variable has a bad value (its name and value are
            in the message).
    """
    if isinstance(app, ResilientApp):
        raise ValueError("app is already wrapped by resilient(); wrap the original app once")
    if not callable(app):
        raise ValueError(
            f"app must be an ASGI application (called with scope, receive, send), got {app!r}"
        )
    given = {
        name: value
        for name, value in locals().items()
        if name not in ("app", "environ") and value is not DEFAULT
    }
    env = os.environ if environ is None else environ
    from_env = options_from_env(env)
    options = {**_DEFAULTS, **from_env, **given}
    for name in _SWITCHES:
        if not isinstance(options[name], bool):
            raise ValueError(f"{name} must be True or False, got {options[name]!r}")
    if options["rate_limit"] is None:
        for name in _RATE_LIMIT_OPTIONS:
            value = given.get(name)
            if name in from_env or (value is not None and value != _DEFAULTS.get(name)):
                raise ConfigurationError(
                    f"{name} does nothing without rate_limit: set rate_limit too (the limit "
                    f"of every other route, such as '100/minute'), or leave {name} out"
                )
    if options["max_concurrency"] is None and ("max_lag" in given or "max_lag" in from_env):
        raise ConfigurationError(
            "max_lag does nothing without max_concurrency: set max_concurrency (a number or "
            "'adaptive') too, or leave max_lag out"
        )
    if options["debug"] is None:  # APP_ENV / ENVIRONMENT, read from the same mapping
        options["debug"] = default_debug(env)
    return _build(app, **options)


def _build(
    app: ASGIApp,
    *,
    debug: bool | None,
    envelope: bool,
    request_ids: bool,
    request_id_header: str,
    trust_incoming_request_id: bool,
    access_log: bool,
    access_logger: logging.Logger | None,
    access_log_sink: JsonLinesSink | None,
    access_log_exclude_paths: Iterable[str],
    slow_threshold: float,
    errors: bool,
    envelope_exclude_paths: Iterable[str],
    lifespan: Lifespan | None,
    health_path: str | None,
    health_status_details: bool,
    health_cache_ttl: float,
    version: str | None,
    rate_limit: str | None,
    rate_limit_backend: str | Backend,
    rate_limit_strategy: StrategyName,
    rate_limit_key: str | KeyFunction,
    rate_limit_routes: Mapping[str, str] | None,
    rate_limit_exempt_paths: Iterable[str],
    rate_limit_on_backend_error: Literal["allow", "deny"],
    rate_limit_backend_timeout: float,
    trusted_proxies: Iterable[str],
    forwarded_header: Literal["x-forwarded-for", "forwarded"],
    metrics: bool,
    metrics_path: str | None,
    registry: CollectorRegistry | None,
    tracing: bool,
    tracer_provider: TracerProvider | None,
    max_concurrency: int | Literal["adaptive"] | None,
    max_queue: int | None,
    queue_timeout: float,
    max_lag: float | None,
    timeout: float | None,
    timeout_routes: Mapping[str, float | None] | None,
    max_body_size: int | None,
    body_limit_routes: Mapping[str, int | None] | None,
) -> ResilientApp:
    """``resilient()`` once every option is known."""
    lifespan = lifespan if lifespan is not None else Lifespan(registry=registry)
    if lifespan.registry is None:
        lifespan.registry = registry
    proxies = TrustedProxies(trusted_proxies, header=forwarded_header)
    # Probes and scrapes, wherever health_path and metrics_path put them: never logged,
    # measured or traced.
    probes = [p for p in (health_path, "/livez", "/readyz", metrics_path) if p]
    stack: ASGIApp = app
    if envelope:
        stack = EnvelopeMiddleware(stack, exclude_paths=envelope_exclude_paths)
    if max_body_size is not None or body_limit_routes:
        stack = BodyLimitMiddleware(stack, max_body_size=max_body_size, routes=body_limit_routes)
    if max_concurrency is not None:
        stack = ConcurrencyLimitMiddleware(
            stack,
            limit=max_concurrency,
            max_queue=max_queue,
            queue_timeout=queue_timeout,
            max_lag=max_lag,
            exempt_paths=probes,
            registry=registry,
        )
    elif max_queue is not None:
        raise ConfigurationError(
            "max_queue does nothing without max_concurrency: set max_concurrency (a number or "
            "'adaptive') too, or leave max_queue out"
        )
    if rate_limit is not None:
        if rate_limit_key == "user":
            raise ConfigurationError(
                "rate_limit_key='user' cannot work here: resilient() limits requests before "
                "your app's authentication sets scope['user']. Add RateLimitMiddleware(key="
                "'user') inside your app, after its AuthenticationMiddleware, or limit by "
                "'header:<name>'."
            )
        backend = rate_limit_backend
        if isinstance(backend, str):
            backend = backend_from_url(backend)
            lifespan.add_resource(
                _unique("rate-limit-backend", lifespan.resource_names), backend.aclose, timeout=2
            )
            ping = getattr(backend, "ping", None)
            if ping is not None:
                # A backend that cannot be reached at startup is a configuration error: fail
                # fast rather than run unlimited (or refuse everything) from the first request.
                name = _unique("rate-limit-backend", lifespan.checks)
                lifespan.add_check(name, ping, timeout=2, attempts=3, readiness=False)
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
    if timeout is not None or timeout_routes:
        stack = TimeoutMiddleware(stack, timeout=timeout, routes=timeout_routes, registry=registry)
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
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and (
            "prometheus-multiprocess" not in lifespan.resource_names
        ):
            lifespan.add_resource("prometheus-multiprocess", _mark_process_dead, timeout=2)
    if endpoints:
        stack = BuiltinEndpoints(stack, endpoints=endpoints)
    if errors:
        stack = ErrorMiddleware(stack, debug=debug, format="envelope" if envelope else "problem")
    # The layers that observe requests run in one pass (asgi_resilience.observe), in the order
    # nesting them would have: request ids, tracing, metrics, access log.
    observers: list[Observer] = []
    if request_ids:
        observers.append(
            RequestIdMiddleware(
                stack,
                header_name=request_id_header,
                trust_incoming=trust_incoming_request_id,
                error_format="envelope" if envelope else "problem",
            )
        )
    if tracing:
        observers.append(
            TracingMiddleware(stack, tracer_provider=tracer_provider, exclude_paths=probes)
        )
    if metrics:
        observers.append(MetricsMiddleware(stack, registry=registry, exclude_paths=probes))
    if access_log:
        if access_log_sink is not None:
            name = _unique("access-log-sink", lifespan.resource_names)
            lifespan.add_resource(name, access_log_sink.aflush, timeout=2)
        if access_log_exclude_paths is DEFAULT_EXCLUDE_PATHS:
            access_log_exclude_paths = probes
        observers.append(
            AccessLogMiddleware(
                stack,
                logger=access_logger,
                sink=access_log_sink,
                exclude_paths=access_log_exclude_paths,
                slow_threshold=slow_threshold,
                trusted_proxies=proxies,
            )
        )
    if len(observers) == 1:
        stack = observers[0]
    elif observers:
        stack = Observers(stack, observers)
    stack = LifespanMiddleware(stack, lifespan=lifespan)
    return ResilientApp(app, stack, lifespan, health)


def _unique(name: str, taken: Iterable[str]) -> str:
    """``name``, or ``name-2``, ``name-3``...: the same lifespan may serve several stacks."""
    taken = set(taken)
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}-{number}"
    return candidate


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
