"""``asgi-resilience doctor``: the configuration mistakes that hurt in production, found before
deploying.

``diagnose(app, workers=..., grace_period=...)`` inspects the stack a ``resilient()`` app was
built with (``ResilientApp.options`` and its lifespan) and returns one ``Finding`` per check:
``error`` (the service will misbehave: fix it before deploying), ``warning`` (it may, depending
on where it runs) or ``ok``. Nothing is started, no dependency is called: it reads the
configuration only, so it runs anywhere the app imports (a CI job, a container build).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import default_debug
from .ratelimit.backends import MemoryBackend

__all__ = ["Finding", "Severity", "diagnose"]

Severity = Literal["error", "warning", "ok"]


@dataclass(frozen=True)
class Finding:
    """One check's outcome.

    Attributes:
        severity: ``"error"``, ``"warning"`` or ``"ok"``.
        check: the check's name (``rate-limit-backend``), stable for scripts.
        message: what was found.
        fix: what to do about it (empty for ``ok``).
    """

    severity: Severity
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        """``error    rate-limit-backend  ...; fix: ...``: how the command prints it."""
        text = f"{self.severity:<8} {self.check:<20} {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def diagnose(
    app: Any,
    *,
    workers: int = 1,
    grace_period: float = 30.0,
    environ: Mapping[str, str] | None = None,
    run_by_cli: bool = False,
) -> list[Finding]:
    """Every finding for ``app`` (a ``ResilientApp``), in a fixed order.

    Args:
        app: what ``resilient()`` returned.
        workers: the worker processes it will run in.
        grace_period: the seconds the platform waits after SIGTERM before it kills the process
            (Kubernetes' ``terminationGracePeriodSeconds``, 30 by default).
        environ: the environment it will run in (``os.environ``).
        run_by_cli: it will be served by ``asgi-resilience run`` (which sets up multiprocess
            metrics for several workers itself).

    Raises:
        ValueError: ``app`` is not a ``resilient()`` app, or an argument is wrong.
    """
    from .stack import ResilientApp

    if not isinstance(app, ResilientApp):
        raise ValueError(
            f"doctor inspects the stack resilient() builds; {app!r} is not a resilient() app "
            "(wrap it: app = resilient(app))"
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    if isinstance(grace_period, bool) or not isinstance(grace_period, int | float):
        raise ValueError(f"grace_period must be a number of seconds, got {grace_period!r}")
    if not grace_period > 0:
        raise ValueError(f"grace_period must be > 0 seconds, got {grace_period!r}")
    env = os.environ if environ is None else environ
    return [
        finding(app, workers=workers, grace_period=float(grace_period), environ=env, cli=run_by_cli)
        for finding in _CHECKS
    ]


_Check = Callable[..., Finding]
_CHECKS: list[_Check] = []


def _check(function: _Check) -> _Check:
    _CHECKS.append(function)
    return function


@_check
def _debug(app: Any, *, environ: Mapping[str, str], **_: Any) -> Finding:
    if not app.options.debug:
        return Finding("ok", "debug", "debug is off: 500s reveal nothing of their cause")
    if default_debug(environ):
        return Finding(
            "warning",
            "debug",
            "debug is on (APP_ENV/ENVIRONMENT says development): 500 bodies show the "
            "exception and its traceback",
            "make sure production sets APP_ENV=production",
        )
    return Finding(
        "error",
        "debug",
        "debug is on outside development: every 500 body shows the exception, its message "
        "and its traceback to the client",
        "debug=False (or leave it None and set APP_ENV=production)",
    )


@_check
def _rate_limit_backend(app: Any, *, workers: int, **_: Any) -> Finding:
    options = app.options
    if options.rate_limit is None:
        return Finding("ok", "rate-limit-backend", "no rate limit")
    backend = options.rate_limit_backend
    in_memory = isinstance(backend, MemoryBackend) or (
        isinstance(backend, str) and backend.lower().startswith("memory:")
    )
    if not in_memory:
        return Finding("ok", "rate-limit-backend", "the rate limit is shared by every worker")
    if workers > 1:
        return Finding(
            "error",
            "rate-limit-backend",
            f"a memory rate limit under {workers} workers: each worker limits alone, so the "
            f"service admits up to {workers} times {options.rate_limit!r}",
            "rate_limit_backend='redis://host:6379/0' (ASGI_RESILIENCE_RATE_LIMIT_BACKEND), "
            "or one worker",
        )
    return Finding(
        "warning",
        "rate-limit-backend",
        "a memory rate limit: exact in this process, but every replica of the service limits alone",
        "rate_limit_backend='redis://host:6379/0' if the service runs more than one replica",
    )


@_check
def _trusted_proxies(app: Any, **_: Any) -> Finding:
    options = app.options
    if options.trusted_proxies:
        return Finding(
            "ok", "trusted-proxies", f"client addresses read through {options.trusted_proxies}"
        )
    by_address = options.rate_limit is not None and options.rate_limit_key == "ip"
    effect = (
        "the first busy client gets everyone rate limited (429)"
        if by_address
        else "the access log, the spans and operational_allow see the balancer, not the client"
    )
    return Finding(
        "warning",
        "trusted-proxies",
        f"no trusted_proxies: behind a load balancer every client shares its address, so {effect}",
        "trusted_proxies=['10.0.0.0/8'] (the balancer's addresses; "
        "ASGI_RESILIENCE_TRUSTED_PROXIES), or leave it empty if clients connect directly",
    )


@_check
def _operational_endpoints(app: Any, **_: Any) -> Finding:
    options = app.options
    served = [path for path in _operational_paths(app)]
    if not served:
        return Finding("ok", "operational-endpoints", "no metrics or status endpoint is served")
    if options.management_port is not None:
        return Finding(
            "ok",
            "operational-endpoints",
            f"{', '.join(served)} served on the management port {options.management_port} only",
        )
    if options.operational_allow is not None:
        return Finding(
            "ok",
            "operational-endpoints",
            f"{', '.join(served)} readable from {list(options.operational_allow)} only",
        )
    return Finding(
        "warning",
        "operational-endpoints",
        f"{', '.join(served)} answer anyone on the application's port (route names, traffic, "
        "error rates, versions)",
        "management_port=9090 (--management-port), or operational_allow=['10.0.0.0/8']",
    )


def lifespans(app: Any) -> list[Any]:
    """The lifespans the service runs: the stack's, and a ``Lifespan`` given to the framework
    instead (``Starlette(lifespan=lifespan)``), which runs inside the stack's shutdown."""
    from .lifespan import Lifespan

    found = [app.lifespan]
    framework = getattr(getattr(app.app, "router", None), "lifespan_context", None)
    if isinstance(framework, Lifespan) and framework is not app.lifespan:
        found.append(framework)
    return found


@_check
def _shutdown_time(app: Any, *, grace_period: float, **_: Any) -> Finding:
    # One after the other: the stack drains and stops, the framework's lifespan inside it.
    drain_delay = sum(lifespan.drain_delay for lifespan in lifespans(app))
    shutdown_timeout = sum(lifespan.shutdown_timeout for lifespan in lifespans(app))
    needed = drain_delay + shutdown_timeout
    spelled = f"drain_delay {drain_delay:g} s + shutdown_timeout {shutdown_timeout:g} s"
    if needed > grace_period:
        return Finding(
            "error",
            "shutdown-time",
            f"{spelled} = {needed:g} s, longer than the {grace_period:g} s grace period: the "
            "process is killed before its resources are closed",
            f"terminationGracePeriodSeconds >= {needed + 5:g}, or a shorter drain_delay or "
            "shutdown_timeout",
        )
    return Finding(
        "ok",
        "shutdown-time",
        f"{spelled} = {needed:g} s, within the {grace_period:g} s grace period",
    )


@_check
def _startup_checks(app: Any, **_: Any) -> Finding:
    checks = [name for lifespan in lifespans(app) for name in lifespan.checks]
    if checks:
        return Finding("ok", "startup-checks", f"{len(checks)} startup checks: {', '.join(checks)}")
    return Finding(
        "warning",
        "startup-checks",
        "no startup checks: the service reports ready before it knows its database or "
        "dependencies answer",
        "lifespan.add_check('database', ping) for each dependency (or Database(...) from "
        "asgi_resilience.sqlalchemy)",
    )


@_check
def _multiprocess_metrics(
    app: Any, *, workers: int, environ: Mapping[str, str], cli: bool, **_: Any
) -> Finding:
    if not app.options.metrics or workers == 1:
        return Finding("ok", "multiprocess-metrics", "one process: its registry is the service's")
    if cli or environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return Finding(
            "ok", "multiprocess-metrics", f"{workers} workers' metrics merged on every scrape"
        )
    return Finding(
        "error",
        "multiprocess-metrics",
        f"{workers} workers without PROMETHEUS_MULTIPROC_DIR: each scrape reads one worker's "
        "counters, so rates jump and totals go backwards",
        "serve it with asgi-resilience run --workers N (it sets the directory up), or set "
        "PROMETHEUS_MULTIPROC_DIR to an empty directory before the workers start",
    )


@_check
def _health_details(app: Any, **_: Any) -> Finding:
    options = app.options
    if not options.health_status_details or options.health_path is None:
        return Finding("ok", "health-details", "no status details are served")
    if options.management_port is not None or options.operational_allow is not None:
        return Finding("ok", "health-details", "status details are not public")
    return Finding(
        "warning",
        "health-details",
        f"{options.health_path}/status shows versions, checks, tasks and process facts to anyone",
        "operational_allow=['10.0.0.0/8'], a management_port, or health_status_details=False",
    )


def _operational_paths(app: Any) -> Iterator[str]:
    options = app.options
    if options.metrics_path is not None:
        yield options.metrics_path
    if options.health_path is not None and options.health_status_details:
        yield f"{options.health_path}/status"
