"""SIGTERM draining: readiness fails at once, the server's own handler runs ``drain_delay`` later.

Ours is chained before the server's, not instead of it: uvicorn (and every server) closes its
listener in its own handler, so delaying that handler is what keeps the service serving while
the load balancer notices the failing readiness probe.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Protocol

import anyio.from_thread
import anyio.lowlevel

__all__ = ["SigtermWatch"]

_Timer = threading.Timer  # what waits out the drain delay (tests put a timer they fire in)


class _Draining(Protocol):
    """What the watch needs of its lifespan."""

    drain_delay: float
    logger: logging.Logger

    @property
    def ready(self) -> bool: ...

    def begin_drain(self) -> None: ...

    def go_away(self) -> None: ...

    def go_away_in(self, seconds: float) -> None: ...


class SigtermWatch:
    """Our SIGTERM handler, installed in the main thread while a lifespan runs."""

    def __init__(self, owner: _Draining) -> None:
        self.owner = owner
        self._previous: Any = None
        self._installed = False
        self._loop_token: Any = None
        self._timer: threading.Timer | None = None
        self.received = False  # a SIGTERM came while ours was installed (since install)

    @property
    def installed(self) -> bool:
        """Ours is SIGTERM's handler now."""
        return self._installed and signal.getsignal(signal.SIGTERM) == self._on_sigterm

    def install(self) -> None:
        """Put our handler in front of the current one (main thread only; once)."""
        if self._installed:
            return  # never chain to ourselves
        self.received = False
        if threading.current_thread() is not threading.main_thread():
            self.owner.logger.debug("Not in the main thread: SIGTERM draining not installed")
            return
        self._previous = signal.getsignal(signal.SIGTERM)
        self._loop_token = anyio.lowlevel.current_token()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def restore(self) -> None:
        """Give SIGTERM back to the handler we found, and forget a pending hand-over."""
        if self._timer is not None:
            self._timer.cancel()
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        owner = self.owner
        self.received = True
        if not owner.ready or owner.drain_delay <= 0:
            owner.begin_drain()  # a second SIGTERM, or no delay wanted: hand over now
            # In a signal handler: the loop is told from a thread, as the timer does.
            owner.go_away_in(0)
            self._hand_over(signum, frame)
            return
        owner.begin_drain()
        owner.logger.info("SIGTERM: serving %gs more before shutdown", owner.drain_delay)
        self._timer = _Timer(owner.drain_delay, self._hand_over_later, (signum,))
        self._timer.daemon = True
        self._timer.start()

    def _hand_over_later(self, signum: int) -> None:
        # The timer's thread asks the event loop (in the main thread, where the handler was
        # installed) to close long-lived connections and run the server's handler, waking it
        # if it is idle.
        def on_the_loop() -> None:
            self.owner.go_away()
            self._hand_over(signum, None)

        try:
            anyio.from_thread.run_sync(on_the_loop, token=self._loop_token)
        except RuntimeError:
            self.owner.logger.debug("Event loop gone before the drain delay ended")

    def _hand_over(self, signum: int, frame: FrameType | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
