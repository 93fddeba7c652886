"""Worker processes without an HTTP application: a ``Lifespan`` served on its own.

A queue consumer, a scheduler or an exporter has checks, resources and background tasks but no
API; Kubernetes still needs its probes and Prometheus its scrape. ``serve(lifespan)`` (also
``Lifespan.serve`` and ``asgi-resilience worker module:lifespan``) serves the whole stack around
an app with no routes of its own: ``/health/live``, ``/health/ready``, ``/health`` (and
``/health/status`` when enabled), ``/metrics``, and a 404 problem for anything else; the stack is
configured from the ``ASGI_RESILIENCE_*`` variables as ``resilient()`` always is. uvicorn serves
it (the ``server`` extra), so the lifespan runs exactly as under an API: startup checks first
(a failed critical check ends the process before it serves), then the tasks; SIGTERM drains
(readiness 503 for ``drain_delay``), stops the tasks, closes the resources, logs the report.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from .exceptions import NotFound, StartupError, UsageError
from .lifespan import Lifespan
from .stack import ResilientApp, resilient
from .types import Receive, Scope, Send

__all__ = ["serve", "worker_app"]


async def _no_routes(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        raise NotFound()  # the error layer renders it as the stack's 404 problem
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1000})
    # lifespan: returning at once tells the layer around it that there is no app lifespan.


def worker_app(lifespan: Lifespan, **options: Any) -> ResilientApp:
    """The stack around an app without routes, running ``lifespan``; ``options`` go to
    ``resilient()``."""
    if not isinstance(lifespan, Lifespan):
        raise ValueError(f"lifespan must be a Lifespan, got {lifespan!r}")
    return resilient(_no_routes, lifespan=lifespan, **options)


def serve(
    lifespan: Lifespan,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Serve ``lifespan``'s health endpoints and metrics on ``host:port`` until SIGTERM or
    SIGINT, running its checks, resources and tasks; returns after a graceful stop.

    Logging: when the root logger has no handler yet, JSON lines on stdout as
    ``asgi-resilience run`` writes them; a configured one is left as it is.

    Raises:
        StartupError: startup failed (a critical check, a resource); nothing was served.
        UsageError: uvicorn is not installed.
    """
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serving needs uvicorn: pip install 'asgi-resilience[server]'") from None
    app = worker_app(lifespan, **options)
    if not logging.getLogger().handlers:
        from .cli import configure_logging

        configure_logging(log_level)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        log_level=log_level,
        access_log=False,  # the stack's access log, when enabled
        proxy_headers=False,  # trusted_proxies decides, not any local peer
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the SIGTERM it handled once it has stopped; ours swallows it so that a
    # graceful stop returns instead of ending the process by signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raised the SIGINT it stopped for: a graceful stop, as for SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    if lifespan.state == "failed" or not server.started:
        raise StartupError(
            "startup failed: "
            + (
                "; ".join(
                    f"check {r.name!r} failed: {r.error}"
                    for r in lifespan.startup_results.values()
                    if not r.ok and r.critical
                )
                or "see the log above"
            )
        )
