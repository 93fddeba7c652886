"""The resource stack: opened in registration order at startup, closed in reverse at shutdown.

A resource's close is waited for up to its timeout (and what is left of ``shutdown_timeout``);
one still running then is cancelled, and if it ignores the cancellation (a close that shields
itself around a hung call), abandoned: the next resource is closed all the same, and the report
says ``abandoned``. To be abandonable, work must run in a task of its own (``_detached``):

- an async generator resource lives in one *keeper* task from its setup to its teardown: the
  setup runs there up to ``yield``, the keeper then waits, and at shutdown resumes the
  generator there. One task, one context: a cancel scope or task group held open across the
  ``yield``, a context variable set before it and reset after it, all work as in a plain
  ``async with``. The value (and the context variables the setup set) are the keeper's; the
  lifespan hands the value on as state;
- a close callable (``add_resource``) runs in a task of its own, in a copy of the lifespan's
  context.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from time import monotonic, perf_counter
from typing import Any, Literal

import anyio

from ..calls import call as _call
from ..calls import describe_error
from ..exceptions import StartupError
from ._detached import Detached

__all__ = ["ResourceFactory", "ResourceOutcome", "ResourceReport", "Resources"]

ResourceFactory = Callable[[], AsyncIterator[Any]]
ResourceOutcome = Literal["ok", "error", "timeout"]


@dataclass(frozen=True)
class ResourceReport:
    """How one resource closed: ``ok``, ``error`` or ``timeout``, and how long. ``abandoned``:
    the close was still running when the shutdown moved on (it ignored its cancellation)."""

    name: str
    outcome: ResourceOutcome
    duration: float
    error: str | None = None
    abandoned: bool = False


@dataclass
class _Resource:
    name: str
    timeout: float
    close: Callable[[], Any]
    factory: ResourceFactory | None = None
    keeper: _Keeper | None = None


class _Keeper:
    """The task an async generator resource lives in, from its setup to its teardown."""

    def __init__(self, name: str, factory: ResourceFactory) -> None:
        self.name = name
        self.factory = factory
        self.opened = anyio.Event()
        self.close_now = anyio.Event()
        self.value: Any = None
        self.open_error: BaseException | None = None
        self.run: Detached | None = None

    def start(self) -> None:
        self.run = Detached.start(self._live, name=f"asgi-resilience resource {self.name}")

    async def _live(self) -> None:
        generator = self.factory()
        try:
            self.value = await generator.__anext__()
        except BaseException as exc:
            self.open_error = exc
            raise
        finally:
            self.opened.set()
        await self.close_now.wait()
        try:
            await generator.__anext__()
        except StopAsyncIteration:
            return
        await generator.aclose()  # type: ignore[attr-defined]
        raise RuntimeError(f"resource {self.name!r} yielded more than once")


class Resources:
    """The registered resources and, while started, the opened ones."""

    def __init__(self) -> None:
        self._registered: list[_Resource] = []
        self._opened: list[_Resource] = []
        self._abandoned: list[tuple[str, Detached]] = []

    @property
    def names(self) -> list[str]:
        """The registered resources, in registration order."""
        return [resource.name for resource in self._registered]

    @property
    def still_running(self) -> list[str]:
        """Closes abandoned at a shutdown that have not ended since."""
        return [name for name, run in self._abandoned if run.running]

    @property
    def opened_names(self) -> list[str]:
        """The resources open now, in the order they were opened."""
        return [resource.name for resource in self._opened]

    def register(
        self,
        name: str,
        timeout: float,
        close: Callable[[], Any] | None = None,
        factory: ResourceFactory | None = None,
    ) -> None:
        """A resource closed by ``close``, or opened and closed by the async generator
        ``factory``; names are unique (checked by the caller)."""
        self._registered.append(_Resource(name, timeout, close or _not_opened, factory))

    async def open(self, values: dict[str, Any]) -> None:
        """Open every resource in order; each opened value lands in ``values``.

        Raises:
            StartupError: one could not be opened, or not within its timeout. What was
                opened before it stays open: ``close()`` closes it.
        """
        for resource in self._registered:
            if resource.factory is None:
                self._opened.append(resource)
                continue
            keeper = _Keeper(resource.name, resource.factory)
            keeper.start()
            assert keeper.run is not None
            with anyio.move_on_after(resource.timeout):
                await keeper.opened.wait()
            if not keeper.opened.is_set():
                await keeper.run.stop(0)  # cancelled; abandoned if it will not stop
                raise StartupError(
                    f"startup failed: resource {resource.name!r} did not open within "
                    f"{resource.timeout:g}s"
                )
            failure = keeper.open_error
            if failure is not None:
                await keeper.run.wait(0)  # its task ends with the exception
                if not isinstance(failure, Exception):
                    raise failure  # a cancellation, KeyboardInterrupt...: not a failure of ours
                raise StartupError(
                    f"startup failed: resource {resource.name!r} could not be opened: "
                    f"{describe_error(failure)}"
                ) from failure
            values[resource.name] = keeper.value
            self._opened.append(
                _Resource(resource.name, resource.timeout, _not_opened, keeper=keeper)
            )

    async def close(self, total: float, *, grace: float = 0.0) -> list[ResourceReport]:
        """Close the opened resources in reverse order, each within its own timeout and all
        within ``total`` seconds, failures isolated; one report per resource.

        Past ``total``, the resources not closed yet (a hung close took the time) share
        ``grace`` more seconds, in equal parts: one stuck close must not leave the others
        open.
        """
        deadline = monotonic() + total
        last = deadline + grace
        reports = []
        while self._opened:
            resource = self._opened.pop()
            now = monotonic()
            if now < deadline:
                left = deadline - now
            else:
                left = (last - now) / (len(self._opened) + 1)
            budget = max(0.0, min(resource.timeout, left))
            reports.append(await _close_one(resource, budget, self._abandoned))
        return reports


async def _close_one(
    resource: _Resource, budget: float, abandoned: list[tuple[str, Detached]]
) -> ResourceReport:
    began = perf_counter()
    if budget <= 0:
        return ResourceReport(resource.name, "timeout", 0.0, "not closed: shutdown_timeout spent")

    if resource.keeper is not None:
        run = resource.keeper.run
        assert run is not None
        resource.keeper.close_now.set()  # its teardown, in the task it lives in
    else:
        close = resource.close

        async def call_close() -> None:
            await _call(close)

        run = Detached.start(call_close, name=f"asgi-resilience close {resource.name}")
    ended = await run.stop(budget)
    duration = perf_counter() - began
    if ended == "abandoned":
        abandoned.append((resource.name, run))
        error = f"abandoned after {budget:g}s, still running (it ignored its cancellation)"
        return ResourceReport(resource.name, "timeout", duration, error, abandoned=True)
    if ended == "cancelled":
        return ResourceReport(resource.name, "timeout", duration, f"cancelled after {budget:g}s")
    if run.error is not None:
        return ResourceReport(resource.name, "error", duration, describe_error(run.error))
    return ResourceReport(resource.name, "ok", duration)


async def _not_opened() -> None:
    """The close of a resource factory: its keeper closes it."""
