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
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import anyio.lowlevel

__all__ = ["Detached"]

_running: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones


class Detached:
    """``function()`` running in a task of its own; start it with ``Detached.start``."""

    def __init__(self, function: Callable[[], Awaitable[Any]]) -> None:
        self.function = function
        self.done = anyio.Event()
        self.error: Exception | None = None
        self.result: Any = None
        self._scope: anyio.CancelScope | None = None
        self._cancelled = False

    @classmethod
    def start(cls, function: Callable[[], Awaitable[Any]], *, name: str = "") -> Detached:
        """Start ``function()`` now, from inside the event loop (asyncio or trio)."""
        run = cls(function)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            import trio  # not asyncio: anyio's other backend

            trio.lowlevel.spawn_system_task(run._run, name=name or None)
        else:
            task = loop.create_task(run._run(), name=name or None)
            _running.add(task)
            task.add_done_callback(_running.discard)
        return run

    async def _run(self) -> None:
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._cancelled:
                    scope.cancel()
                try:
                    self.result = await self.function()
                except Exception as exc:  # handed to whoever waits, never lost in the task
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

    async def stop(self, seconds: float) -> Literal["ended", "cancelled", "abandoned"]:
        """Wait up to ``seconds`` for it to end; then cancel it and let it unwind for
        a moment (two checkpoints: no time). ``abandoned``: it ignored the cancellation and
        runs on, unwaited for."""
        if await self.wait(seconds):
            return "ended"
        self.cancel()
        with anyio.CancelScope(shield=True):
            for _ in range(2):
                await anyio.lowlevel.checkpoint()
        return "cancelled" if self.done.is_set() else "abandoned"
