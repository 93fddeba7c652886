"""Work run in a task of its own, so that waiting for it can end while it still runs.

A close that shields itself from cancellation around a hung call, or a background task that
swallows its cancellation, would hold a task group (and so the whole shutdown) open forever:
structured concurrency waits for every child. Run detached, such work can be waited for with a
deadline, cancelled, and abandoned when it ignores the cancellation, while the shutdown goes on.

anyio offers no detached task (on purpose), so this is backend-specific and small: an asyncio
task of the running loop, or a trio system task. The work runs inside an anyio cancel scope of
its own, which ``cancel()`` cancels on either backend.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio

__all__ = ["Detached"]

_running: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
UNWIND = 0.2  # seconds a cancelled piece of work gets to finish before it is abandoned


class Detached:
    """``function()`` running in a task of its own; start it with ``Detached.start``."""

    def __init__(self, function: Callable[[], Awaitable[Any]]) -> None:
        self.function = function
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.result: Any = None
        self._scope: anyio.CancelScope | None = None
        self._cancelled = False

    @classmethod
    def start(cls, function: Callable[[], Awaitable[Any]], *, name: str = "") -> Detached:
        """Start ``function()`` now, from inside the event loop (asyncio or trio), in a copy
        of the caller's context (its context variables)."""
        run = cls(function)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            import trio  # not asyncio: anyio's other backend

            # A system task runs in trio.run's context unless given one.
            context = contextvars.copy_context()
            trio.lowlevel.spawn_system_task(run._run, name=name or None, context=context)
        else:
            task = loop.create_task(run._run(), name=name or None)  # copies the context
            _running.add(task)
            task.add_done_callback(_running.discard)
        return run

    async def _run(self) -> None:
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._cancelled:
                    scope.cancel()
                self.result = await self.function()
        except anyio.get_cancelled_exc_class():
            raise  # the event loop's own end (a trio system task may end so; asyncio too)
        except BaseException as exc:  # kept for whoever waits, never lost
            # Groups included: on trio an exception leaving a system task would end the run.
            self.error = exc
        finally:
            self.done.set()

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    def cancel(self) -> None:
        """Cancel it (at its next checkpoint outside a shielded scope)."""
        self._cancelled = True
        if self._scope is not None:
            self._scope.cancel()

    async def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for it to end, shielded from the caller's own
        cancellation (a server cancelling its lifespan task must not cut a shutdown step
        short); ``True`` when it ended."""
        with anyio.move_on_after(max(0.0, seconds), shield=True):
            await self.done.wait()
        return self.done.is_set()

    async def stop(
        self, seconds: float, *, unwind: float = UNWIND
    ) -> Literal["ended", "cancelled", "abandoned"]:
        """Wait up to ``seconds`` for it to end; then cancel it and give it ``unwind``
        seconds to finish (its cleanup: a task group ending, a last message to a server).
        ``abandoned``: it ignored the cancellation and runs on, unwaited for."""
        if await self.wait(seconds):
            return "ended"
        self.cancel()
        return "cancelled" if await self.wait(unwind) else "abandoned"
