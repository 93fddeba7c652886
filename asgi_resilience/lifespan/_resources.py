"""The resource stack: opened in registration order at startup, closed in reverse at shutdown.

Each close runs in a task of its own (``_detached``) and is waited for up to its timeout (and
what is left of ``shutdown_timeout``); one still running then is cancelled, and if it ignores
the cancellation (a close that shields itself around a hung call), abandoned: the next resource
is closed all the same, and the report says ``abandoned``. An async generator resource is
therefore finished in another task than the one that opened it: it must not hold a cancel scope
or a task group open across its ``yield`` (start background work with ``@lifespan.task``).
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

__all__ = ["ResourceFactory", "ResourceReport", "Resources"]

ResourceFactory = Callable[[], AsyncIterator[Any]]


@dataclass(frozen=True)
class ResourceReport:
    """How one resource closed: ``ok``, ``error`` or ``timeout``, and how long. ``abandoned``:
    the close was still running when the shutdown moved on (it ignored its cancellation)."""

    name: str
    outcome: Literal["ok", "error", "timeout"]
    duration: float
    error: str | None = None
    abandoned: bool = False


@dataclass
class _Resource:
    name: str
    timeout: float
    close: Callable[[], Any]
    factory: ResourceFactory | None = None


class Resources:
    """The registered resources and, while started, the opened ones."""

    def __init__(self) -> None:
        self._registered: list[_Resource] = []
        self._opened: list[_Resource] = []

    @property
    def names(self) -> list[str]:
        """The registered resources, in registration order."""
        return [resource.name for resource in self._registered]

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
            generator = resource.factory()
            value: Any = None
            try:
                # move_on_after: a TimeoutError the setup raises itself is its own error.
                with anyio.move_on_after(resource.timeout) as deadline:
                    value = await generator.__anext__()
            except Exception as exc:
                raise StartupError(
                    f"startup failed: resource {resource.name!r} could not be opened: "
                    f"{describe_error(exc)}"
                ) from exc
            if deadline.cancelled_caught:
                raise StartupError(
                    f"startup failed: resource {resource.name!r} did not open within "
                    f"{resource.timeout:g}s"
                )
            values[resource.name] = value
            self._opened.append(
                _Resource(resource.name, resource.timeout, _closer(resource.name, generator))
            )

    async def close(self, total: float, *, grace: float = 0.0) -> list[ResourceReport]:
        """Close the opened resources in reverse order, each within its own timeout and all
        within ``total`` seconds, failures isolated; one report per resource.

        Past ``total``, the resources not closed yet (a hung close took the time) still get
        ``grace`` seconds between them: one stuck close must not leave the others open.
        """
        deadline = monotonic() + total
        last = deadline + grace
        reports = []
        while self._opened:
            resource = self._opened.pop()
            now = monotonic()
            left = (deadline if now < deadline else last) - now
            reports.append(await _close_one(resource, max(0.0, min(resource.timeout, left))))
        return reports


async def _close_one(resource: _Resource, budget: float) -> ResourceReport:
    began = perf_counter()
    if budget <= 0:
        return ResourceReport(resource.name, "timeout", 0.0, "not closed: shutdown_timeout spent")

    async def close() -> None:
        await _call(resource.close)

    run = Detached.start(close, name=f"asgi-resilience close {resource.name}")
    ended = await run.stop(budget)
    duration = perf_counter() - began
    if ended == "abandoned":
        error = f"abandoned after {budget:g}s, still running (it ignored its cancellation)"
        return ResourceReport(resource.name, "timeout", duration, error, abandoned=True)
    if ended == "cancelled":
        return ResourceReport(resource.name, "timeout", duration, f"cancelled after {budget:g}s")
    if run.error is not None:
        return ResourceReport(resource.name, "error", duration, describe_error(run.error))
    return ResourceReport(resource.name, "ok", duration)


async def _not_opened() -> None:
    """Placeholder close of a resource factory; replaced by ``_closer`` once opened."""


def _closer(name: str, generator: AsyncIterator[Any]) -> Callable[[], Any]:
    async def close() -> None:
        try:
            await generator.__anext__()
        except StopAsyncIteration:
            return
        await generator.aclose()  # type: ignore[attr-defined]
        raise RuntimeError(f"resource {name!r} yielded more than once")

    return close
