"""The management listener: ``/metrics``, ``<health>/status`` and ``<health>/drain`` on a port
of their own (``resilient(management_port=9090)``), as Spring Boot Actuator serves its endpoints
on a management port: the application's port, the one the load balancer exposes, then shows
nothing of the service's internals.

The listener is a lifespan resource: it opens with the other resources at startup (a port in use
fails the startup, naming the port), serves through the drain, and closes at shutdown; the port
is free once the process has stopped. It is served by Hypercorn's ``serve()`` in the running
event loop (asyncio or trio), stopped through its ``shutdown_trigger``: a well-kept server rather
than an HTTP parser of our own, and one that installs no signal handler and leaves the main
server's loggers alone. Hypercorn comes with the ``server`` extra.

Several worker processes (Prometheus multiprocess mode, as ``asgi-resilience run --workers``
sets up) each open the listener on the same port with ``SO_REUSEPORT``: the kernel spreads the
connections, and whichever worker answers serves the metrics of all of them, merged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from ._extras import missing_extra
from .problems import send_error
from .types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from .lifespan import Lifespan

__all__ = ["ManagementListener"]

_logger = logging.getLogger("asgi_resilience.management")


class ManagementListener:
    """Serve ``app`` on ``host:port`` while the lifespan runs (``serve`` is its resource).

    Args:
        app: what answers there (``resilient()`` gives it the operational endpoints).
        host: the address to listen on (``"0.0.0.0"``: every IPv4 interface; ``"::"`` IPv6).
        port: the port (0: any free port, logged).
        reuse_port: share the port with the other worker processes (``SO_REUSEPORT``);
            ``None``: when Prometheus multiprocess mode says there are several.
        environ: where ``PROMETHEUS_MULTIPROC_DIR`` is read for ``reuse_port=None``.
        lifespan: the lifespan whose resource it is: during its ``trial_startup()``
            (``asgi-resilience check``) no port is bound, as the service may be running.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "0.0.0.0",
        port: int,
        reuse_port: bool | None = None,
        environ: Mapping[str, str] | None = None,
        lifespan: Lifespan | None = None,
    ) -> None:
        self.app = _Lifespanless(app)
        self.lifespan = lifespan
        self.host = host
        self.port = port
        env = os.environ if environ is None else environ
        self.reuse_port = (
            bool(env.get("PROMETHEUS_MULTIPROC_DIR")) if reuse_port is None else reuse_port
        )
        self.address: tuple[str, int] | None = None  # where it listens, while it does

    async def serve(self) -> AsyncIterator[str]:
        """The resource: bind, serve until the lifespan closes it, then stop serving (the
        connections left get Hypercorn's graceful timeout, one second)."""
        if self.lifespan is not None and self.lifespan.trial:
            yield ""  # a trial of the startup: nothing to serve, and the port may be taken
            return
        require_server()
        from hypercorn.config import Config

        sock = self._bind()
        host, port = sock.getsockname()[:2]
        config = Config()
        config.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns the socket from here on
        config.accesslog = None
        config.errorlog = _quiet_logger()
        config.graceful_timeout = 1.0
        config.keep_alive_timeout = 5.0
        stop = anyio.Event()
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        async with anyio.create_task_group() as group:
            group.start_soon(_serve, self.app, config, stop)
            self.address = (host, port)
            _logger.info("Management endpoints on %s", url)
            try:
                yield url
            finally:
                self.address = None
                stop.set()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno,
                f"management_port {self.port} on {self.host}: {exc.strerror} (choose a free "
                "port for --management-port / ASGI_RESILIENCE_MANAGEMENT_PORT)",
            ) from None
        sock.setblocking(False)
        return sock


async def _serve(app: ASGIApp, config: Any, stop: anyio.Event) -> None:
    serve: Any
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop: trio runs this lifespan
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve
    await serve(app, config, shutdown_trigger=stop.wait)


def _quiet_logger() -> logging.Logger:
    """Hypercorn's messages (its "Running on ..." among them) below WARNING dropped: ours says
    where the listener is, and the main server's log stays the one place a port is announced.
    A logger of its own, outside the logging tree's names, whose records propagate to
    ``asgi_resilience``'s handlers."""
    quiet = logging.Logger("asgi_resilience.management.server", logging.WARNING)
    quiet.parent = _logger
    return quiet


class _Lifespanless:
    """``app`` with the lifespan scope answered here: the listener's server starts its own
    lifespan, and the service's lifespan is run by the main server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            await self.app(scope, receive, send)


def require_server() -> None:
    """Raise, naming the extra, when Hypercorn (the listener's server) is not installed."""
    try:
        import hypercorn.config  # noqa: F401
    except ModuleNotFoundError as exc:
        missing_extra(exc, "server", "management_port", ("hypercorn",))


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """Everything the management port does not serve: a 404 problem."""
    if scope["type"] == "http":
        await send_error(None, scope, send, 404)
