"""``asgi-resilience run --server granian``: Granian, with SIGTERM draining that works.

Granian's main process handles SIGTERM by stopping its workers at once, and each worker stops
its listener through ``loop.add_signal_handler``, which no handler chained in front can delay:
the lifespan's drain never gets its delay. Here the main process drains first: on the first
SIGTERM (or SIGINT) it sends every worker ``DRAIN_SIGNAL`` (SIGUSR1), on which each worker's
lifespan begins draining (``Lifespan.drain_now``: readiness 503 at once, long-lived connections
told to close when ``drain_delay`` ends), waits ``drain_delay``, then lets Granian stop its
workers as it always does: each finishes the requests in flight, runs the lifespan shutdown (the
app's own included) and exits; Granian then exits 0. A second signal stops at once.

What this relies on of Granian beyond its documented options: the server class's
``signal_handler_interrupt`` (called for SIGINT/SIGTERM) and its worker list ``wrks`` with their
processes (``inner.pid``), as in Granian 2.x.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from .exceptions import UsageError

__all__ = ["DRAIN_SIGNAL", "install_drain_signal", "serve_granian"]

DRAIN_SIGNAL = signal.SIGUSR1
_DRAIN_VARIABLE = "_ASGI_RESILIENCE_DRAIN_SIGNAL"  # set for the workers: listen for it
_logger = logging.getLogger("asgi_resilience.cli")


def install_drain_signal(lifespan: Any) -> None:
    """In a worker process: drain ``lifespan`` on ``DRAIN_SIGNAL`` (when the parent asks)."""
    if os.environ.get(_DRAIN_VARIABLE) != str(int(DRAIN_SIGNAL)):
        return

    def on_drain(signum: int, frame: FrameType | None) -> None:
        lifespan.drain_now()

    signal.signal(DRAIN_SIGNAL, on_drain)


def serve_granian(
    host: str,
    port: int,
    uds: str | None,
    workers: int,
    log_level: str,
    drain_delay: float,
    *,
    root_path: str = "",
) -> int:
    """Serve ``asgi_resilience.cli:worker_app`` (the caller has set its variables) with Granian
    until SIGTERM or SIGINT, draining first; 0 after a graceful stop. ``root_path`` is
    Granian's ``url_path_prefix``: the ASGI ``root_path`` of every scope."""
    try:
        from granian.constants import Interfaces
        from granian.server import Server
    except ImportError:
        raise UsageError("--server granian needs Granian: pip install granian") from None

    class DrainingServer(Server):  # type: ignore[misc, valid-type]
        draining = False

        def signal_handler_interrupt(self, *args: Any, **kwargs: Any) -> None:
            if self.draining or drain_delay <= 0:
                super().signal_handler_interrupt(*args, **kwargs)
                return
            self.draining = True
            for worker in list(self.wrks):
                pid = getattr(getattr(worker, "inner", None), "pid", None)
                if pid:
                    os.kill(pid, DRAIN_SIGNAL)
            _logger.info("SIGTERM: the workers drain for %gs, then stop", drain_delay)
            stop = threading.Timer(drain_delay, super().signal_handler_interrupt)
            stop.daemon = True
            stop.start()

    os.environ[_DRAIN_VARIABLE] = str(int(DRAIN_SIGNAL))
    # Workers are fresh interpreters (spawn, not fork): they read PROMETHEUS_MULTIPROC_DIR before
    # prometheus_client is imported, and build their own stack once. Until a worker has
    # installed its drain handler, DRAIN_SIGNAL is ignored (inherited across exec), never the
    # default action, which would kill it.
    multiprocessing.set_start_method("spawn", force=True)
    signal.signal(DRAIN_SIGNAL, signal.SIG_IGN)
    options: dict[str, Any] = {
        "interface": Interfaces.ASGI,
        "workers": workers,
        "factory": True,
        "log_level": log_level,
        "log_access": False,  # ours: one structured record per request
        "url_path_prefix": root_path or None,
        # Granian's own lines through the root's handler (JSON lines), not a console of its own.
        "log_dictconfig": {
            "loggers": {
                "_granian": {"level": log_level.upper(), "propagate": True},
                "granian.access": {"level": "WARNING", "propagate": False},
            }
        },
    }
    if uds is not None:
        options["uds"] = Path(uds)
    else:
        options.update(address=host, port=port)
    DrainingServer("asgi_resilience.cli:worker_app", **options).serve()
    return 0
