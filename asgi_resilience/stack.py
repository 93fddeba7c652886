"""``resilient(app)``: the whole stack around an ASGI application, in the right order."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from .access_log import DEFAULT_EXCLUDE_PATHS, AccessLogMiddleware, JsonLinesSink
from .config import DEFAULTS, ConfigurationError, Options, options_from_env
from .context import RequestContext, route_path
from .envelope import EnvelopeMiddleware
from .errors import ErrorHook, ErrorMiddleware, default_debug
from .health import HealthApp
from .lifespan import Lifespan, LifespanMiddleware
from .metrics import MetricsMiddleware, metrics_app
from .observe import Observer, Observers
from .overload import BodyLimitMiddleware, ConcurrencyLimitMiddleware, TimeoutMiddleware
from .problems import send_error
from .proxies import TrustedProxies, parse_address
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

if TYPE_CHECKING:
    from .management import ManagementListener
from .websockets import WebSocketMiddleware

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
        options: every option the stack was built with, from keywords, the environment and
            the defaults (what ``asgi-resilience doctor`` inspects).
        management: the ``management_port`` listener (``.address`` while it listens), if any.
    """

    def __init__(
        self,
        app: ASGIApp,
        stack: ASGIApp,
        lifespan: Lifespan,
        health: HealthApp | None,
        options: Options | None = None,
    ) -> None:
        self.app = app
        self.stack = stack
        self.lifespan = lifespan
        self.health = health
        self.options = options if options is not None else Options()
        self.management: ManagementListener | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stack(scope, receive, send)


# The options that only shape a rate limit: they do nothing without rate_limit.
_RATE_LIMIT_OPTIONS = (
    "rate_limit_backend",
    "rate_limit_strategy",
    "rate_limit_key",
    "rate_limit_routes",
    "rate_limit_exempt_paths",
    "rate_limit_on_backend_error",
    "rate_limit_backend_timeout",
)


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
    on_error: ErrorHook | None = None,
    cors: Mapping[str, Any] | None = None,
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
    operational_allow: Iterable[str] | None = DEFAULT,
    management_port: int | None = DEFAULT,
    management_host: str = DEFAULT,
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
    kept), CORS (only with ``cors``), request ids, tracing, metrics and the access log (those
    four in one pass: ``asgi_resilience.observe``), error normalization, the built-in endpoints
    (``/metrics``, health), the deadline (only with ``timeout``), rate limits (only with
    ``rate_limit``), the concurrency limit (only with ``max_concurrency``), the body limit (only
    with ``max_body_size``), envelopes (only when ``envelope=True``), then ``app``. Errors take
    the envelope shape when envelopes are on, the RFC 9457 problem shape otherwise. WebSocket
    scopes pass through every layer (but CORS). For a FastAPI app, the error responses these
    layers can answer are added to its OpenAPI document (``asgi_resilience.openapi``).

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
        on_error: called with ``(exc, context)`` once per unhandled exception, after the 500
            went out (an error reporter such as Sentry; see ``ErrorMiddleware``). Needs
            ``errors``.
        cors: keyword arguments of Starlette's ``CORSMiddleware``
            (``{"allow_origins": ["https://app.example"]}``), put outermost so that every
            response, the errors, 429s and 503s the stack renders itself included, carries the
            CORS headers, and preflights are answered before any limit. ``expose_headers``
            defaults to the headers the stack adds (the request id, ``Retry-After``, the
            ``RateLimit`` headers) so that browser code can read them. ``None``: no CORS.
        envelope_exclude_paths: paths whose responses are never enveloped (besides, always,
            a FastAPI app's ``openapi_url`` and docs: the document and the docs' own requests
            must keep their shape).
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
        operational_allow: networks (``"10.0.0.0/8"``, ``"127.0.0.1"``, ``"unix"`` for a peer on
            a unix socket) that may read ``metrics_path`` and ``<health_path>/status``, judged on
            the client address after ``trusted_proxies`` (a forwarded address counts only
            through a trusted proxy); anyone else gets 404, as if nothing were there. ``None``:
            anyone. The probes (``/health/live``, ``/health/ready``) stay open.
        management_port: serve ``metrics_path``, ``<health_path>/status`` and
            ``<health_path>/drain`` on this port instead (a listener the lifespan opens and
            closes, ``asgi_resilience.management``; the ``server`` extra): on the application's
            port they answer 404. The probes answer on both. ``None``: no management port.
        management_host: the address the management port listens on.
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
            arguments win over them. ``PROMETHEUS_MULTIPROC_DIR`` too: with ``{}``, ``/metrics``
            serves this process's registry and no worker is marked dead at shutdown
            (prometheus_client itself still chose its value store from ``os.environ`` when it
            was imported).

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
    options = Options(**{**from_env, **given})  # each value checked, naming the option
    if options.rate_limit is None:
        for name in _RATE_LIMIT_OPTIONS:
            value = given.get(name)
            if name in from_env or (value is not None and value != DEFAULTS[name]):
                raise _does_nothing_without(name, "rate_limit")
    if options.max_concurrency is None:
        for name in ("max_lag", "queue_timeout"):
            if name in given or name in from_env:
                raise _does_nothing_without(name, "max_concurrency")
    if options.debug is None:  # APP_ENV / ENVIRONMENT, read from the same mapping
        options = replace(options, debug=default_debug(env))
    return _build(app, options, env)


def _build(app: ASGIApp, o: Options, environ: Mapping[str, str]) -> ResilientApp:
    """``resilient()`` once every option is known."""
    lifespan = o.lifespan if o.lifespan is not None else Lifespan(registry=o.registry)
    if lifespan.registry is None:
        lifespan.registry = o.registry
    proxies = TrustedProxies(o.trusted_proxies, header=o.forwarded_header)
    # Probes and scrapes, wherever health_path and metrics_path put them: never logged,
    # measured or traced.
    probes = [p for p in (o.health_path, "/livez", "/readyz", o.metrics_path) if p]
    stack: ASGIApp = app
    if o.envelope:
        stack = EnvelopeMiddleware(
            stack, exclude_paths=(*o.envelope_exclude_paths, *_schema_paths(app))
        )
    if o.max_body_size is not None or o.body_limit_routes:
        stack = BodyLimitMiddleware(
            stack, max_body_size=o.max_body_size, routes=o.body_limit_routes
        )
    if o.max_concurrency is not None:
        stack = ConcurrencyLimitMiddleware(
            stack,
            limit=o.max_concurrency,
            max_queue=o.max_queue,
            queue_timeout=o.queue_timeout,
            max_lag=o.max_lag,
            exempt_paths=probes,
            registry=o.registry,
        )
    elif o.max_queue is not None:
        raise _does_nothing_without("max_queue", "max_concurrency")
    if o.rate_limit is not None:
        if o.rate_limit_key == "user":
            raise ConfigurationError(
                "rate_limit_key='user' cannot work here: resilient() limits requests before "
                "your app's authentication sets scope['user']. Add RateLimitMiddleware(key="
                "'user') inside your app, after its AuthenticationMiddleware, or limit by "
                "'header:<name>'."
            )
        backend = o.rate_limit_backend
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
            limit=o.rate_limit,
            strategy=o.rate_limit_strategy,
            backend=backend,
            key=o.rate_limit_key,
            trusted_proxies=proxies,
            routes=o.rate_limit_routes,
            exempt_paths=o.rate_limit_exempt_paths,
            on_backend_error=o.rate_limit_on_backend_error,
            backend_timeout=o.rate_limit_backend_timeout,
            registry=o.registry,
        )
    if o.timeout is not None or o.timeout_routes:
        stack = TimeoutMiddleware(
            stack, timeout=o.timeout, routes=o.timeout_routes, registry=o.registry
        )
    endpoints: dict[str, ASGIApp] = {}
    health = None
    if o.health_path is not None:
        health = HealthApp(
            lifespan,
            path=o.health_path,
            cache_ttl=o.health_cache_ttl,
            status_details=o.health_status_details,
            version=o.version,
        )
        endpoints.update(dict.fromkeys(health.paths, health))
    if o.metrics_path is not None:
        endpoints[o.metrics_path] = metrics_app(o.registry, environ=environ)
        if environ.get("PROMETHEUS_MULTIPROC_DIR") and (
            "prometheus-multiprocess" not in lifespan.resource_names
        ):
            lifespan.add_resource("prometheus-multiprocess", _mark_process_dead, timeout=2)
    guarded = [p for p in (o.metrics_path, health and f"{o.health_path}/status") if p]
    management = None
    if o.management_port is not None:
        management = _management(o, lifespan, endpoints, guarded, proxies, environ)
        # The application's port keeps the probes only: the rest answers 404 there.
        operational = {*guarded, health and health.drain_path}
        endpoints = {path: app for path, app in endpoints.items() if path not in operational}
    if endpoints:
        stack = _builtin_endpoints(stack, o, endpoints, guarded, proxies)
    if o.errors:
        stack = _error_layer(stack, o)
    elif o.on_error is not None:
        raise ConfigurationError(
            "on_error does nothing with errors=False: the error layer calls it; "
            "leave errors on or on_error out"
        )
    # The layers that observe requests run in one pass (asgi_resilience.observe), in the order
    # nesting them would have: request ids, tracing, metrics, access log.
    observers: list[Observer] = []
    request_ids = None
    if o.request_ids:
        request_ids = RequestIdMiddleware(
            stack,
            header_name=o.request_id_header,
            trust_incoming=o.trust_incoming_request_id,
            error_format="envelope" if o.envelope else "problem",
        )
        observers.append(request_ids)
    if o.tracing:
        observers.append(
            TracingMiddleware(stack, tracer_provider=o.tracer_provider, exclude_paths=probes)
        )
    if o.metrics:
        observers.append(MetricsMiddleware(stack, registry=o.registry, exclude_paths=probes))
    if o.access_log:
        if o.access_log_sink is not None:
            name = _unique("access-log-sink", lifespan.resource_names)
            lifespan.add_resource(name, o.access_log_sink.aflush, timeout=2)
        exclude = o.access_log_exclude_paths
        if exclude is DEFAULT_EXCLUDE_PATHS:  # not given: wherever the probes are
            exclude = tuple(probes)
        observers.append(
            AccessLogMiddleware(
                stack,
                logger=o.access_logger,
                sink=o.access_log_sink,
                exclude_paths=exclude,
                slow_threshold=o.slow_threshold,
                trusted_proxies=proxies,
            )
        )
    if len(observers) == 1:
        stack = observers[0]
    elif observers:
        stack = Observers(stack, observers)
    sessions = WebSocketMiddleware(
        stack, lifespan=lifespan, request_ids=request_ids, registry=o.registry
    )
    if o.cors is not None:
        stack = _cors(stack, o)
    stack = LifespanMiddleware(stack, lifespan=lifespan, websocket_app=sessions)
    for prefix, fastapi_app in _fastapi_apps(app):
        _document_errors(fastapi_app, o, prefix)
    resilient_app = ResilientApp(app, stack, lifespan, health, o)
    resilient_app.management = management
    return resilient_app


# What each option that others depend on takes, for the error naming it.
_REQUIRED_FORM = {
    "rate_limit": "the limit of every other route, such as '100/minute'",
    "max_concurrency": "a number or 'adaptive'",
}


def _does_nothing_without(name: str, required: str) -> ConfigurationError:
    return ConfigurationError(
        f"{name} does nothing without {required}: set {required} too "
        f"({_REQUIRED_FORM[required]}), or leave {name} out"
    )


def _builtin_endpoints(
    app: ASGIApp,
    o: Options,
    endpoints: dict[str, ASGIApp],
    guarded: list[str],
    proxies: TrustedProxies,
) -> BuiltinEndpoints:
    """The built-in endpoints in front of ``app``, the allow list guarding the operational."""
    return BuiltinEndpoints(
        app,
        endpoints=endpoints,
        guarded=guarded,
        allow=o.operational_allow,
        trusted_proxies=proxies,
    )


def _error_layer(app: ASGIApp, o: Options) -> ErrorMiddleware:
    """The error layer as the options shape it: on the application's port and the
    management port alike."""
    return ErrorMiddleware(
        app,
        debug=o.debug,
        format="envelope" if o.envelope else "problem",
        on_error=o.on_error,
    )


def _management(
    o: Options,
    lifespan: Lifespan,
    endpoints: dict[str, ASGIApp],
    guarded: list[str],
    proxies: TrustedProxies,
    environ: Mapping[str, str],
) -> ManagementListener:
    """The listener of ``management_port``, a resource of the lifespan, answering every
    built-in endpoint (the allow list applies there too)."""
    from .management import ManagementListener, not_found, require_server

    require_server()  # fail where the app is built, not at its first startup

    served: ASGIApp = _builtin_endpoints(not_found, o, endpoints, guarded, proxies)
    if o.errors:
        served = _error_layer(served, o)
    assert o.management_port is not None
    listener = ManagementListener(
        served, host=o.management_host, port=o.management_port, environ=environ, lifespan=lifespan
    )
    name = _unique("management-listener", lifespan.resource_names)
    lifespan.resource(name, timeout=5)(listener.serve)
    return listener


def _is_fastapi(app: ASGIApp) -> bool:
    fastapi = sys.modules.get("fastapi")  # a FastAPI app: its module is imported already
    return fastapi is not None and isinstance(app, fastapi.FastAPI)


def _document_errors(app: ASGIApp, o: Options, prefix: str) -> None:
    """The error responses this stack can answer, in the OpenAPI document of the FastAPI app
    mounted at ``prefix`` (``""``: the wrapped app itself). Its paths are relative to the
    mount: route options and exclusions are matched with the prefix in front."""
    from .openapi import _document, stack_statuses

    statuses = stack_statuses(o)

    def mounted(path: str, method: str, operation: dict[str, Any]) -> Iterable[int]:
        return statuses(prefix + path, method, operation)

    # envelope_exclude_paths as the mount sees them: below the prefix, or all of it.
    excluded = []
    for path in o.envelope_exclude_paths:
        stem = path.rstrip("/")
        if prefix and (prefix == stem or prefix.startswith(stem + "/")):
            excluded.append("/")
        elif not prefix or path.startswith(prefix + "/"):
            excluded.append(path[len(prefix) :])
    _document(
        app,
        mounted if prefix else statuses,
        "envelope" if o.envelope and o.errors else "problem",
        o.envelope,
        (*excluded, *_schema_paths(app)),  # the document's own paths are the mount's
        rewrites=o.errors,
    )


def _fastapi_apps(app: ASGIApp, prefix: str = "") -> list[tuple[str, Any]]:
    """``app`` if it is a FastAPI app, and the FastAPI apps mounted inside it (``Mount`` of a
    sub-application), each with the path prefix it is mounted under."""
    found: list[tuple[str, Any]] = [(prefix, app)] if _is_fastapi(app) else []
    for route in getattr(app, "routes", None) or ():
        inner = getattr(route, "app", None)
        path = getattr(route, "path", None)
        if (
            inner is not None
            and inner is not app
            and isinstance(path, str)
            and (hasattr(route, "routes") or _is_fastapi(inner))
        ):
            found += _fastapi_apps(inner, prefix + path.rstrip("/"))
    return found


def _schema_paths(app: ASGIApp) -> tuple[str, ...]:
    """A FastAPI app's OpenAPI document and docs (its ``openapi_url``, ``docs_url``,
    ``redoc_url``, the OAuth2 redirect), and those of the FastAPI apps mounted inside it,
    prefixed: never enveloped, or ``/docs`` cannot read the schema."""
    found: list[str] = []
    for prefix, fastapi_app in _fastapi_apps(app):
        for name in ("openapi_url", "docs_url", "redoc_url", "swagger_ui_oauth2_redirect_url"):
            path = getattr(fastapi_app, name, None)
            if isinstance(path, str) and path.startswith("/"):
                found.append(prefix + path)
    return tuple(found)


# The response headers of the stack that browser code may want to read (CORS hides all but a
# few "safelisted" ones unless they are exposed).
_EXPOSED_HEADERS = (
    "Retry-After",
    "RateLimit",
    "RateLimit-Policy",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)


def _cors(app: ASGIApp, o: Options) -> ASGIApp:
    """Starlette's ``CORSMiddleware`` around the whole HTTP stack (not written here: it is the
    well-kept implementation users already trust), exposing our headers unless told which."""
    from starlette.middleware.cors import CORSMiddleware

    options = dict(o.cors)
    if "expose_headers" not in options:
        own = (o.request_id_header,) if o.request_ids else ()
        options["expose_headers"] = [*own, *_EXPOSED_HEADERS]
    return CORSMiddleware(app, **options)


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
        guarded: the paths only ``allow`` may read (the operational ones: metrics, status).
        allow: networks (``"10.0.0.0/8"``, ``"unix"``) allowed to read ``guarded`` paths;
            anyone else gets 404. ``None``: anyone.
        trusted_proxies: whose forwarding headers name the client that ``allow`` judges.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        endpoints: dict[str, ASGIApp],
        guarded: Iterable[str] = (),
        allow: Iterable[str] | None = None,
        trusted_proxies: TrustedProxies | None = None,
    ) -> None:
        self.app = app
        self.endpoints = dict(endpoints)
        self.guarded = frozenset(guarded) if allow is not None else frozenset()
        # The same parsing and address test as trusted proxies: networks and "unix".
        self.allow = TrustedProxies(allow) if allow is not None else None
        self.proxies = trusted_proxies if trusted_proxies else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = route_path(scope) if scope.get("root_path") else scope["path"]
            endpoint = self.endpoints.get(path)
            if endpoint is not None:
                if path in self.guarded and not self._allowed(scope):
                    await send_error(RequestContext.current(), scope, send, 404)
                    return
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        """Is the client (after trusted proxies) in ``allow``?"""
        assert self.allow is not None
        context = RequestContext.current()
        if self.proxies is None:
            peer = scope.get("client")
            client = str(peer[0]) if peer and peer[0] else None
        elif context is not None:
            client = self.proxies.apply(context, scope)
        else:
            client = self.proxies.client(scope)
        if client is None:  # a peer on a unix socket (servers give it no address)
            return self.allow.unix
        address = parse_address(client)
        return address is not None and self.allow.is_trusted(address)
