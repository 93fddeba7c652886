"""Calling user code (checks, closers, providers) from the event loop, and describing its
failures for operators."""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

__all__ = ["call", "describe_error", "in_daemon_thread"]

_MAX_ERROR_CHARS = 300


async def call(function: Callable[[], Any]) -> Any:
    """Await an async callable; run a sync one in a daemon thread (abandoned on timeout)."""
    if inspect.iscoroutinefunction(function):
        return await function()
    result = await in_daemon_thread(function)
    if inspect.isawaitable(result):
        return await result
    return result


async def in_daemon_thread(function: Callable[[], Any]) -> Any:
    """Run a blocking callable in a thread of its own and wait for it, cancellably.

    Not anyio's worker threads: a check that hangs in a blocking call is abandoned at its
    timeout, but a worker thread (not a daemon) would still keep the process from exiting, so a
    failed startup would hang instead of exiting non-zero. A daemon thread does not.
    """
    await anyio.lowlevel.checkpoint()  # already cancelled (no time left): do not start it
    done = anyio.Event()
    token = anyio.lowlevel.current_token()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as exc:  # handed to the waiting task, raised there
            outcome["error"] = exc
        try:
            anyio.from_thread.run_sync(done.set, token=token)
        except RuntimeError:
            pass  # the event loop is gone: nobody is waiting any more

    name = f"asgi-resilience {getattr(function, '__qualname__', 'call')}"
    threading.Thread(target=target, name=name, daemon=True).start()
    await done.wait()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


_CREDENTIALS = re.compile(r"(\w[\w+.-]*://[^:/@\s]*:)[^@\s]+@")


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for reports operators and probes see: credentials in URLs masked
    (``postgresql://user:***@db``), cut to a readable length."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = _CREDENTIALS.sub(r"\1***@", text)
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."
