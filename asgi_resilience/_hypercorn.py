"""``asgi-resilience run --server hypercorn``: Hypercorn, with SIGTERM draining that works.

Hypercorn's own runner cannot drain: with ``-w 1`` the signal reaches its parent process and the
worker stops at once; with ``-w 0`` it installs ``loop.add_signal_handler`` for SIGTERM, which
no handler chained in front of it can delay. Here Hypercorn is driven through its documented
``serve(app, config, shutdown_trigger=...)``, which installs no signal handler: ours (a plain
``signal.signal``) sets the trigger, and the ``Lifespan`` chains its drain in front of it as it
does under uvicorn. SIGTERM: readiness 503 at once, ``drain_delay`` more of serving, then
Hypercorn stops accepting, lets requests in flight finish (``graceful_timeout`` is the
lifespan's ``drain_timeout``), runs the lifespan shutdown (the app's own included) and returns:
exit code 0.

With ``--workers N`` (N > 1) this process binds the socket, starts N worker processes (a fresh
interpreter each, the socket handed over by file descriptor, Prometheus multiprocess mode in a
directory of its own), forwards SIGTERM and SIGINT to them, and exits 0 once all stopped
cleanly. As with Hypercorn's own runner, the first worker to exit by itself (a crash, a failed
startup: status 3) stops the others, and its exit code is the service's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType
from typing import Any

from .exceptions import UsageError

__all__ = ["serve_hypercorn", "serve_hypercorn_workers"]

_FD_VARIABLE = "_ASGI_RESILIENCE_HYPERCORN_FD"
_logger = logging.getLogger("asgi_resilience.cli")


def _config(binds: list[str], log_level: str, graceful_timeout: float, root_path: str) -> Any:
    try:
        from hypercorn.config import Config
    except ImportError:
        raise UsageError("--server hypercorn needs Hypercorn: pip install hypercorn") from None
    config = Config()
    config.bind = binds
    config.accesslog = None  # ours: one structured record per request
    config.errorlog = logging.getLogger("hypercorn.error")  # through the root's JSON lines
    config.loglevel = log_level.upper()
    config.graceful_timeout = graceful_timeout
    config.root_path = root_path
    return config


def serve_hypercorn(app: Any, binds: list[str], log_level: str, root_path: str = "") -> int:
    """Serve ``app`` in this process until SIGTERM or SIGINT; 0 after a graceful stop, 3 when
    the application's startup failed. ``root_path``: the ASGI ``root_path`` of every scope."""
    from hypercorn.asyncio import serve
    from hypercorn.utils import LifespanFailureError

    lifespan = getattr(app, "lifespan", None)
    graceful = float(getattr(lifespan, "drain_timeout", 20.0))
    config = _config(binds, log_level, graceful, root_path)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(stop.set)

        # Installed before the lifespan starts: the lifespan's SIGTERM drain chains in front.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        await serve(app, config, shutdown_trigger=stop.wait, mode="asgi")

    try:
        asyncio.run(main())
    except LifespanFailureError:
        return 3  # the lifespan logged why
    return 0


def worker_main() -> int:
    """One worker of ``serve_hypercorn_workers`` (``python -m asgi_resilience._hypercorn``)."""
    from .cli import worker_app

    fd = int(os.environ[_FD_VARIABLE])
    log_level = os.environ.get("_ASGI_RESILIENCE_CLI_LOG_LEVEL", "info")
    root_path = os.environ.get("_ASGI_RESILIENCE_CLI_ROOT_PATH", "")
    return serve_hypercorn(worker_app(), [f"fd://{fd}"], log_level, root_path)


def serve_hypercorn_workers(host: str, port: int, uds: str | None, workers: int) -> int:
    """Bind, start ``workers`` worker processes on the socket, forward SIGTERM/SIGINT to them,
    wait; 0 when every worker stopped cleanly. The caller has set the worker's variables."""
    if uds is not None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(uds):
            os.unlink(uds)
        listener.bind(uds)
        where = f"unix:{uds}"
    else:
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        where = f"http://{host}:{listener.getsockname()[1]}"
    listener.listen(2048)
    listener.set_inheritable(True)
    env = {**os.environ, _FD_VARIABLE: str(listener.fileno())}
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Before the workers exist: a signal meanwhile must not kill this process and orphan them.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for _ in range(workers):
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "asgi_resilience._hypercorn"],
                env=env,
                pass_fds=(listener.fileno(),),
            )
        )
        if stopping:  # a signal came while starting them: the new one is told too
            forward(signal.SIGTERM, None)
    _logger.info("Running on %s with %d Hypercorn workers", where, workers)
    # As Hypercorn's own runner: the first worker to end (a crash, a failed startup, a
    # signal) ends the service, the others are stopped, and its exit code is the service's.
    first: int | None = None
    while first is None:
        for child in children:
            code = child.poll()
            if code is not None:
                first = code
                break
        else:
            time.sleep(0.05)  # no event to wait on for several children but their exit
    if not stopping:
        _logger.error("A Hypercorn worker exited with %d: stopping the others", first)
        forward(signal.SIGTERM, None)
    codes = [child.wait() for child in children]
    listener.close()
    if uds is not None and os.path.exists(uds):
        os.unlink(uds)
    if all(code == 0 for code in codes):
        return 0
    return first if first is not None and first > 0 else 1  # killed by a signal: 1


if __name__ == "__main__":
    sys.exit(worker_main())
