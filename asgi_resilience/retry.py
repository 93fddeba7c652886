"""``retry``: repeat an async call that failed with a transient error, with full-jitter
exponential backoff, a cap, an overall deadline and respect for ``Retry-After``.

Put it outside a ``CircuitBreaker`` (``asgi_resilience.circuit_breaker``) so each attempt is one
breaker call; a ``CircuitOpenError`` is waited out, never retried in a hot loop.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from random import Random
from typing import Any, ParamSpec, TypeAlias, TypeVar

import anyio

from .calls import describe_error
from .context import remaining_time
from .exceptions import CircuitOpenError

__all__ = ["ExceptionTypes", "Retry", "retry"]

_logger = logging.getLogger("asgi_resilience.retry")

ExceptionTypes: TypeAlias = "type[Exception] | Iterable[type[Exception]]"
P = ParamSpec("P")
T = TypeVar("T")


class Retry:
    """Retry an async call on transient errors, with full-jitter exponential backoff.

    Up to ``attempts`` calls. After a failed attempt ``n`` (1-based) the wait is drawn from
    ``uniform(0, min(max_backoff, backoff * 2 ** (n - 1)))`` ("full jitter", which spreads
    retrying clients best). An exception with a numeric ``retry_after`` attribute (seconds:
    ``CircuitOpenError``, or your own exception carrying an HTTP ``Retry-After``) makes that
    the least wait; if it exceeds ``max_backoff`` the error is re-raised at once rather than
    waiting longer than allowed. A ``CircuitOpenError`` is also waited at least ``backoff``
    (a half-open breaker says ``retry_after=0``), so a retry never spins on an open breaker.
    With ``deadline``, no sleep is started that would end at or past it (the error is
    re-raised instead), and an attempt still running at the deadline is cancelled (its
    ``TimeoutError`` is raised). Exceptions not in ``retry_on``, and cancellation, propagate
    at once; when retries end, the last error is re-raised as it was. Each retry is logged.

    Use ``@retry(...)`` on an ``async def`` or ``await retry(...).call(fn, *args)``; one policy
    may serve concurrent calls (each call's attempts and deadline are its own).

    Args:
        attempts: calls in all, the first included.
        backoff: seconds; the exponential's base, and the least wait on ``CircuitOpenError``.
        max_backoff: seconds; the cap on any wait.
        retry_on: the exception classes worth retrying (``Exception`` subclasses).
        deadline: seconds for the whole call, attempts and waits included.
        random: the jitter's source (a fresh ``Random()`` by default; seed one for tests).
        sleep: how to wait (``anyio.sleep``; injectable for tests).
        clock: monotonic seconds for the deadline; injectable for tests.
        logger: where retries are logged (``asgi_resilience.retry``).
    """

    def __init__(
        self,
        attempts: int = 3,
        *,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
        retry_on: ExceptionTypes = (Exception,),
        deadline: float | None = None,
        random: Random | None = None,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        require_count("attempts", attempts)
        require_seconds("backoff", backoff)
        if not max_backoff >= backoff:
            raise ValueError(f"max_backoff ({max_backoff!r}) must be >= backoff ({backoff!r})")
        if deadline is not None:
            require_seconds("deadline", deadline)
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retry_on = exception_types("retry_on", retry_on)
        if not self.retry_on:
            raise ValueError("retry_on must name at least one exception class to retry")
        self.deadline = deadline
        self.random = random if random is not None else Random()
        self.sleep = sleep
        self.clock = clock
        self.logger = logger if logger is not None else _logger

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)``, retried as configured; never past ``deadline`` nor
        past the current request's (``remaining_time()``), whichever comes first."""
        deadline_at = None if self.deadline is None else self.clock() + self.deadline
        left = remaining_time()
        if left is not None:
            request_at = self.clock() + left
            deadline_at = request_at if deadline_at is None else min(deadline_at, request_at)
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline_at is None else deadline_at - self.clock()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no time left to call {getattr(fn, '__qualname__', fn)}")
            try:
                with anyio.fail_after(remaining):
                    return await fn(*args, **kwargs)
            except self.retry_on as exc:
                wait = self._wait(exc, attempt, deadline_at)
                if wait is None:
                    raise
                self.logger.info(
                    "Retrying %s in %.3fs after %s (attempt %d of %d)",
                    getattr(fn, "__qualname__", fn),
                    wait,
                    describe_error(exc),
                    attempt,
                    self.attempts,
                )
                await self.sleep(wait)
                if deadline_at is not None and self.clock() >= deadline_at:
                    raise  # the sleep overran the deadline: no attempt left to make

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` so that every call is retried."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@retry decorates async functions, not {fn!r}")

        @functools.wraps(fn)
        async def retried(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return retried

    def _wait(self, exc: Exception, attempt: int, deadline_at: float | None) -> float | None:
        """Seconds to sleep before the next attempt, or ``None`` to give up."""
        if attempt >= self.attempts:
            return None
        cap = min(self.max_backoff, self.backoff * 2 ** min(attempt - 1, 64))
        wait = self.random.uniform(0, cap)
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool):
            if not retry_after <= self.max_backoff:  # NaN included
                return None
            wait = max(wait, retry_after)
        if isinstance(exc, CircuitOpenError):
            wait = max(wait, self.backoff)
        if deadline_at is not None and self.clock() + wait >= deadline_at:
            return None
        return wait


retry = Retry  # the design's name: ``@retry(attempts=3)``


def require_count(option: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a whole number >= 1, got {value!r}")


def require_seconds(option: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{option} must be a positive, finite number of seconds, got {value!r}")


def exception_types(option: str, value: ExceptionTypes) -> tuple[type[Exception], ...]:
    types = (value,) if isinstance(value, type) else tuple(value)
    for item in types:
        if not (isinstance(item, type) and issubclass(item, Exception)):
            raise ValueError(
                f"{option} must be Exception subclasses (cancellation always propagates), "
                f"got {item!r}"
            )
    return types
