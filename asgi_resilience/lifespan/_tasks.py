"""Background tasks: started after the startup checks, supervised, stopped before resources close.

Each task's supervision loop runs in a task of its own (``_detached``), so a task that swallows
its cancellation is abandoned at shutdown instead of holding the process. The loop:

- ``every=None``: ``await fn()`` until shutdown; when it returns by itself it is finished (not
  restarted, ``running`` false).
- ``every=s``: ``await fn()`` every ``s`` seconds at a fixed rate, measured from each run's
  start; a run longer than ``s`` is never overlapped: the next one starts when it ends, and
  missed runs are skipped, not made up in a burst.
- A crash (``fn`` raises) is logged once with its traceback, and restarted after a backoff of
  0.5 s doubling to at most 60 s (``restart=False``: left stopped). The backoff starts again
  from 0.5 s after a successful periodic run, or after a long-running task had run for 60 s.

Time is read from the event loop's clock (``anyio.current_time``), so trio's ``MockClock``
drives it in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from time import perf_counter, time
from typing import Any, Literal, Protocol

import anyio

from .._timestamps import format_timestamp
from ..calls import describe_error
from ._detached import Detached

__all__ = ["Task", "TaskReport", "TaskState", "Tasks"]

TaskFunction = Callable[[], Awaitable[Any]]


class _Owner(Protocol):
    logger: logging.Logger


FIRST_BACKOFF = 0.5
MAX_BACKOFF = 60.0


@dataclass(frozen=True)
class Task:
    """A background task registered with ``Lifespan.add_task``."""

    name: str
    function: TaskFunction
    every: float | None = None
    critical: bool = False
    restart: bool = True
    timeout: float = 5.0


@dataclass
class TaskState:
    """What ``/health/status`` shows of a task."""

    running: bool = False
    restarts: int = 0
    runs: int = 0
    last_error: str | None = None
    last_run: str | None = None  # when the last run began, ISO 8601 UTC

    def as_dict(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "restarts": self.restarts,
            "runs": self.runs,
            "last_error": self.last_error,
            "last_run": self.last_run,
        }


@dataclass(frozen=True)
class TaskReport:
    """How a task stopped at shutdown: ``stopped`` (ended when cancelled, or had ended
    already) or ``abandoned`` (still running after its ``timeout``: it ignored the
    cancellation)."""

    name: str
    outcome: Literal["stopped", "abandoned"]
    duration: float


class Tasks:
    """The registered tasks and, while the lifespan runs, their supervision loops."""

    def __init__(self, owner: _Owner, collectors: Callable[[], Any]) -> None:
        self.owner = owner  # whose logger reports crashes (read at each crash: it may change)
        self.collectors = collectors  # -> LifespanCollectors (task_up, task_restarts)
        self.registered: dict[str, Task] = {}
        self.states: dict[str, TaskState] = {}
        self._running: dict[str, Detached] = {}
        self._stopping = False  # cancelled by stop(): what a task raises now is no crash
        self._abandoned: dict[str, Detached] = {}

    @property
    def still_running(self) -> list[str]:
        """Tasks abandoned at a stop that have not ended since."""
        return [name for name, run in self._abandoned.items() if run.running]

    def add(self, task: Task) -> None:
        self.registered[task.name] = task
        self.states[task.name] = TaskState()

    def start(self) -> None:
        """Start every task's supervision loop (from inside the event loop)."""
        self._stopping = False
        for task in self.registered.values():
            state = self.states[task.name] = TaskState(running=True)
            self._set_up(task.name, True)
            self._running[task.name] = Detached.start(
                partial(self._supervise, task, state), name=f"asgi-resilience task {task.name}"
            )

    def down(self) -> list[str]:
        """The critical tasks that are not running now."""
        return [
            name
            for name, task in self.registered.items()
            if task.critical and not self.states[name].running
        ]

    async def stop(self, seconds: float) -> list[TaskReport]:
        """Cancel every task at once; each gets its ``timeout`` (within ``seconds`` in all) to
        finish. One report per task, in registration order."""
        running, self._running = self._running, {}
        began = perf_counter()
        self._stopping = True
        for run in running.values():
            run.cancel()
        ended: dict[str, float] = {}

        async def wait(name: str, run: Detached) -> None:
            budget = min(self.registered[name].timeout, seconds)
            if await run.wait(budget):
                ended[name] = perf_counter() - began

        # Shielded: a server cancelling the lifespan task must not cut the shutdown short.
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as group:
                for name, run in running.items():
                    group.start_soon(wait, name, run)
        reports = []
        for name, run in running.items():
            self.states[name].running = False
            self._set_up(name, False)
            if name in ended:
                reports.append(TaskReport(name, "stopped", ended[name]))
            else:
                self._abandoned[name] = run
                reports.append(TaskReport(name, "abandoned", perf_counter() - began))
        return reports

    async def _supervise(self, task: Task, state: TaskState) -> None:
        try:
            await self._loop(task, state)
        except Exception:  # our own bug, not the task's: say so, and show the task down
            state.running = False
            self._set_up(task.name, False)
            self.owner.logger.exception(
                "Task %r: its supervisor failed; the task is stopped", task.name
            )

    async def _loop(self, task: Task, state: TaskState) -> None:
        failures = 0
        next_start = anyio.current_time()
        while True:
            if task.every is not None:
                await anyio.sleep(max(0.0, next_start - anyio.current_time()))
            began = anyio.current_time()
            state.last_run = format_timestamp(time())
            state.runs += 1
            try:
                await task.function()
            except Exception as exc:
                if self._stopping:
                    return  # raised while being cancelled at shutdown: not a crash
                state.running = False
                self._set_up(task.name, False)
                state.last_error = describe_error(exc)
                if task.every is None and anyio.current_time() - began >= MAX_BACKOFF:
                    failures = 0  # it had been running well: start the backoff again
                failures += 1
                again = task.restart
                # The exponent capped: 2 ** 1024 no longer fits a float (days of crashes).
                delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** min(failures - 1, 16))
                self.owner.logger.error(
                    "Task %r crashed: %s; %s",
                    task.name,
                    state.last_error,
                    f"restarting in {delay:g}s" if again else "not restarted (restart=False)",
                    exc_info=exc,
                    extra={"task": task.name, "restarts": state.restarts},
                )
                if not again:
                    return
                await anyio.sleep(delay)
                state.restarts += 1
                self.collectors().task_restarts.labels(task.name).inc()
                state.running = True
                self._set_up(task.name, True)
                next_start = anyio.current_time()
                continue
            if task.every is None:
                state.running = False
                self._set_up(task.name, False)
                if not self._stopping:  # one that swallowed its cancellation is just stopped
                    self.owner.logger.info("Task %r finished", task.name)
                return
            failures = 0
            next_start = max(next_start + task.every, anyio.current_time())

    def _set_up(self, name: str, up: bool) -> None:
        self.collectors().task_up.labels(name).set(1 if up else 0)
