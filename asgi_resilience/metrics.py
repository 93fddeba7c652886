"""Prometheus metrics: per-request histograms labelled by route template, and ``/metrics``.

Built on ``prometheus_client`` (its registry, exposition and multiprocess mode); what is ours
is the labelling (route templates from the request context, never raw paths; unknown methods
collapsed), the cached label children (``labels()`` costs more than an observation), the
lock-free series the request path updates in a single process (``asgi_resilience.series``), and
one set of collectors per registry, so two apps or the same test twice never register twice.

The HTTP request collectors live here; every other feature declares its own next to its code
(a class decorated with ``@collectors``, built on first use by ``Metrics.feature``), so this
module knows no feature and no feature depends on another's metrics.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from time import perf_counter
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from . import series
from ._checks import check_registry
from ._http import KNOWN_METHODS as KNOWN_METHODS
from ._http import OTHER_METHOD as OTHER_METHOD
from ._http import first_header
from ._multiprocess import remove_dead_live_gauges
from .context import PathSet, RequestContext
from .observe import Observer
from .problems import send_error
from .types import ASGIApp, Receive, Scope, Send

__all__ = ["DECLARED", "Metrics", "MetricsMiddleware", "collectors", "metrics_app"]

DISCONNECTED_STATUS = "499"  # nginx's "client closed request": no status was sent
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
SIZE_BUCKETS = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)

_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()
C = TypeVar("C", bound=type)
T = TypeVar("T")
DECLARED: list[type] = []  # every feature's collectors class, in import order (for tests, docs)


def collectors(cls: C) -> C:
    """Declare a feature's collectors: ``cls(registry, request_path)`` registers them, where
    ``request_path`` offers ``Histogram``/``Counter``/``Gauge`` for metrics the request path
    updates (lock-free series in one process, prometheus_client's in multiprocess mode)."""
    DECLARED.append(cls)
    return cls


class _PrometheusClasses:
    """prometheus_client's metric classes, for the request path in multiprocess mode."""

    Histogram = Histogram
    Counter = Counter

    @staticmethod
    def Gauge(  # stands in for the class
        name: str, documentation: str, labelnames: list[str], *, registry: CollectorRegistry
    ) -> Gauge:
        # In-flight requests of every live worker add up; a stopped worker's are dropped.
        return Gauge(
            name, documentation, labelnames, multiprocess_mode="livesum", registry=registry
        )


class Metrics:
    """The collectors of one registry, made once: ``Metrics.for_registry(registry)`` returns the
    same object for the same registry, so any number of middlewares, lifespans and apps share it.

    Attributes are the HTTP request collectors (``request_duration``, ``time_to_first_byte``,
    ``active_requests``, ``response_body_bytes``, ``exceptions``); ``feature(cls)`` gives a
    feature's own (rate limits, overload, lifespan, health, circuit breakers). The request
    path's are ``asgi_resilience.series`` collectors in a single process with the GIL
    (``labels()`` by position or name, ``remove()``, ``clear()``; children with ``observe``,
    ``inc``, ``dec``, ``set``), prometheus_client's in multiprocess mode; the others always the
    latter.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # The metrics every request updates: lock-free series where they can be (see
        # asgi_resilience.series), prometheus_client's classes in multiprocess mode.
        request_path: Any = series if series.lock_free() else _PrometheusClasses
        self.request_path = request_path
        self._features: dict[Callable[[CollectorRegistry, Any], Any], Any] = {}
        self.request_duration = request_path.Histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests, to the last body byte sent.",
            ["method", "route", "status_code"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_byte = request_path.Histogram(
            "http_server_time_to_first_byte_seconds",
            "Time from the request to the start of its response.",
            ["method", "route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.active_requests = request_path.Gauge(
            "http_server_active_requests",
            "HTTP server requests in flight.",
            ["method"],
            registry=registry,
        )
        self.response_body_bytes = request_path.Histogram(
            "http_server_response_body_bytes",
            "Response body bytes actually sent.",
            ["method", "route", "status_code"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.exceptions = request_path.Counter(
            "http_server_exceptions",
            "Exceptions raised while handling HTTP requests.",
            ["route", "exception_type"],
            registry=registry,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> Metrics:
        """The collectors of ``registry`` (the global ``REGISTRY`` by default), made once."""
        registry = registry if registry is not None else REGISTRY
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = _by_registry[registry] = cls(registry)
        return metrics

    def feature(self, cls: Callable[[CollectorRegistry, Any], T]) -> T:
        """The collectors ``cls`` (a ``@collectors`` class) declares, made once per registry."""
        built = self._features.get(cls)
        if built is None:
            built = self._features[cls] = cls(self.registry, self.request_path)
        return built

    def child(self, collector: Any, *labels: str) -> Any:
        """``collector.labels(*labels)``, cached: the lookup is most of an observation's cost."""
        key = (id(collector), *labels)
        child = self._children.get(key)
        if child is None:
            if not labels and getattr(collector, "_labelnames", None) == ():
                # prometheus_client's collector without labels (multiprocess mode): it is its
                # own child, and labels() refuses ("No label names were set").
                child = self._children[key] = collector
            else:
                child = self._children[key] = collector.labels(*labels)
        return child


class MetricsMiddleware(Observer):
    """Record Prometheus metrics for every HTTP request.

    Handles ``http`` scopes; others pass through. Observes, per request, the duration (to the
    last body byte: background tasks excluded), the time to first byte, the body bytes really
    sent, the requests in flight and the exceptions raised, labelled by method (unknown methods
    as ``_OTHER``), route template (``/items/{item_id}``, unmatched paths as ``<unmatched>``, so
    random paths add no series) and status code (``499`` when the client went away before a
    status was sent). With an active span and OpenMetrics scrapes, the duration carries the
    trace id as an exemplar. Reads and writes no headers; shares the request context's
    recording. Place it inside tracing and outside the access log.

    Args:
        app: the ASGI application.
        registry: the Prometheus registry (the global one by default; inject one per test).
        exclude_paths: paths (and their subpaths) not measured (the scrape endpoint).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: CollectorRegistry | None = None,
        exclude_paths: Iterable[str] = ("/metrics",),
    ) -> None:
        self.app = app
        self.metrics = Metrics.for_registry(check_registry("registry", registry))
        self.excluded = PathSet(exclude_paths, option="exclude_paths")
        # Label children per (method, route, status): one lookup per request for all three.
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._active: dict[str, Any] = {}

    def enter(self, context: RequestContext, scope: Scope) -> tuple[str, Any]:
        method = scope["method"]
        if method not in KNOWN_METHODS:  # method_label(), inline: every request passes here
            method = OTHER_METHOD
        active = self._active.get(method)
        if active is None:
            active = self._active[method] = self.metrics.active_requests.labels(method)
        active.inc()
        return method, active

    def exit(self, context: RequestContext, scope: Scope, state: tuple[str, Any]) -> None:
        method, active = state
        active.dec()
        self._observe(context, scope, method)

    def _observe(self, context: RequestContext, scope: Scope, method: str) -> None:
        route = context.route(scope)
        if context.status is not None:
            status = str(context.status)
        elif isinstance(context.exception, Exception) and not context.disconnected:
            status = "500"  # what the server answers for it
        else:
            status = DISCONNECTED_STATUS
        children = self._children.get((method, route, status))
        if children is None:
            metrics = self.metrics
            children = self._children[(method, route, status)] = (
                metrics.request_duration.labels(method, route, status),
                metrics.time_to_first_byte.labels(method, route),
                metrics.response_body_bytes.labels(method, route, status),
            )
        duration, first_byte, body_bytes = children
        ended = context.response_ended
        trace_id = context.current_trace_id()
        duration.observe(
            (ended if ended is not None else perf_counter()) - context.start,
            {"trace_id": trace_id} if trace_id is not None else None,
        )
        if context.response_started is not None:
            first_byte.observe(context.response_started - context.start)
        body_bytes.observe(context.bytes_sent)
        if context.exception is not None:
            exception_type = type(context.exception).__name__
            self.metrics.child(self.metrics.exceptions, route, exception_type).inc()


_ALLOW = [(b"allow", b"GET, HEAD")]


def metrics_app(
    registry: CollectorRegistry | None = None, *, environ: Mapping[str, str] | None = None
) -> ASGIApp:
    """An ASGI app serving the registry's metrics (``/metrics``).

    Content negotiation as Prometheus does it: OpenMetrics (with exemplars) when the scraper
    accepts ``application/openmetrics-text``, the text format 0.0.4 otherwise. With
    ``PROMETHEUS_MULTIPROC_DIR`` set in ``environ`` (``os.environ`` by default, read at each
    scrape), every worker's files are aggregated at each scrape, and the live gauges
    (requests in flight...) of workers no longer running are removed first: a worker killed
    without its shutdown leaves no value behind. Only GET and HEAD: anything else is a 405
    problem with ``Allow: GET, HEAD``.
    """
    target = registry if registry is not None else REGISTRY
    scraped_environ = os.environ if environ is None else environ

    async def serve_metrics(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_error(RequestContext.current(), scope, send, 405, headers=_ALLOW)
            return
        accept = (first_header(scope["headers"], b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        payload = encoder(_scrape_registry(target, scraped_environ))
        context = RequestContext.current()
        if context is not None:
            context.mark_ours()  # not an error response to rewrite
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(payload)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = b"" if scope["method"] == "HEAD" else payload
        await send({"type": "http.response.body", "body": body})

    return serve_metrics


def _scrape_registry(registry: CollectorRegistry, environ: Mapping[str, str]) -> CollectorRegistry:
    """In multiprocess mode, a fresh registry reading every worker's files (the live gauges of
    workers that died without a word removed first); else ``registry``."""
    directory = environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return registry
    from prometheus_client import multiprocess

    remove_dead_live_gauges(directory)
    aggregated = CollectorRegistry()
    multiprocess.MultiProcessCollector(aggregated, path=directory)  # type: ignore[no-untyped-call]
    return aggregated
