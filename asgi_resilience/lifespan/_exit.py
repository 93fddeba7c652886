"""The last resort of a shutdown that had to abandon work: leave the process.

An abandoned close or task is still a task of the event loop; asyncio (``asyncio.run``) and
trio both wait for every task before they return, so one that ignores cancellation keeps the
process alive after the server believes it has stopped: Kubernetes then kills it at the end of
its grace period, with nothing logged. Instead, a daemon thread gives the server a moment to
end normally, then logs why and exits with status 1 (``os._exit``: the loop cannot be asked).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

__all__ = ["exit_soon"]

EXIT_STATUS = 1


def exit_soon(
    grace: float, logger: logging.Logger, still_running: Callable[[], list[str]]
) -> threading.Timer:
    """Exit the process in ``grace`` seconds unless it has ended by then, or what was abandoned
    (``still_running()``: the names of what still runs) has ended meanwhile."""

    def leave() -> None:
        abandoned = still_running()
        if not abandoned:
            return  # it ended after all: the process ends as it will
        logger.error(
            "Exiting now: %s still running after the shutdown (abandoned); status %d",
            ", ".join(abandoned),
            EXIT_STATUS,
        )
        logging.shutdown()  # flush every handler: nothing runs after os._exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STATUS)

    timer = threading.Timer(grace, leave)
    timer.daemon = True  # a process ending by itself does not wait for it
    timer.start()
    return timer
