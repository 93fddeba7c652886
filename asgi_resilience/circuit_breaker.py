"""Circuit breaker and retries for the calls an application makes to its dependencies.

``CircuitBreaker`` stops calling a dependency that keeps failing, so requests fail fast (a 503
with ``Retry-After`` through ``ErrorMiddleware``) instead of queueing behind its timeouts, then
lets a few trial calls through to learn whether it recovered. ``retry`` repeats a call that
failed with a transient error, sleeping a full-jitter exponential backoff in between. Put the
retry outside the breaker, so that each attempt is one breaker call::

    payments = CircuitBreaker("payments", failure_threshold=5, recovery_timeout=30, timeout=2)

    @retry(attempts=3, retry_on=httpx.TransportError, deadline=5)
    @payments
    async def charge(order: Order) -> Receipt: ...

The state machine is resilience4j's::

    closed --(failure_threshold consecutive failures, or a failure rate over the window)--> open
    open --(recovery_timeout elapsed: the next call finds it)--> half_open
    half_open --(half_open_max_calls trial calls succeeded)--> closed
    half_open --(a trial call failed or timed out)--> open

Every state change is a synchronous section between two awaits: on one event loop no other task
can interleave, so no lock is needed and none is held while the protected call runs. A breaker
therefore belongs to one event loop; it is not thread-safe.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge

from .context import remaining_time
from .exceptions import CircuitOpenError
from .lifespan import Lifespan
from .metrics import Metrics, collectors
from .retry import ExceptionTypes, Retry, exception_types, require_count, require_seconds, retry

# Retry lives in asgi_resilience.retry; it is re-exported here, beside the breaker it wraps.
__all__ = ["BreakerState", "CallOutcome", "CircuitBreaker", "Retry", "retry"]

_logger = logging.getLogger("asgi_resilience.circuit_breaker")

BreakerState = Literal["closed", "open", "half_open"]
CallOutcome = Literal["success", "failure", "timeout", "excluded", "rejected"]
STATES: tuple[BreakerState, ...] = ("closed", "open", "half_open")


@collectors
class BreakerCollectors:
    """Each breaker's state and the outcomes of the calls through it."""

    def __init__(self, registry: CollectorRegistry, request_path: Any) -> None:
        self.breaker_state = Gauge(
            "asgi_resilience_circuit_breaker_state",
            "1 for the state each circuit breaker is in, 0 for the others.",
            ["breaker", "state"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.breaker_calls = Counter(
            "asgi_resilience_circuit_breaker_calls",
            "Calls through circuit breakers by outcome.",
            ["breaker", "outcome"],
            registry=registry,
        )


OUTCOMES: tuple[CallOutcome, ...] = ("success", "failure", "timeout", "excluded", "rejected")
STATUS_SECTION = "circuit_breakers"

P = ParamSpec("P")
T = TypeVar("T")


class _Call:
    """One admitted call: the state generation it was admitted in, whether it holds a
    half-open permit, when it started, and its timeout scope."""

    __slots__ = ("breaker", "generation", "scope", "started", "trial")

    def __init__(
        self, breaker: CircuitBreaker, generation: int, trial: bool, started: float
    ) -> None:
        self.breaker = breaker
        self.generation = generation
        self.trial = trial
        self.started = started
        self.scope: anyio.CancelScope | None = None


# The calls entered with ``async with breaker:`` in the current task, innermost last (pushed by
# __aenter__, popped by __aexit__): a breaker is shared by concurrent tasks, so what one entry
# must remember cannot live on the breaker.
_entered: ContextVar[tuple[_Call, ...]] = ContextVar("asgi_resilience_breaker_calls", default=())


class CircuitBreaker:
    """Fail fast while a dependency is down; let trial calls find out when it is back.

    Closed, every call goes through and its outcome is recorded: ``failure_threshold``
    consecutive failures open the breaker (a success resets the count), or, with
    ``failure_rate_threshold``, a failure rate at or above it over the last ``window_size``
    calls once at least ``minimum_calls`` were recorded (``failure_threshold`` is then unused).
    Open, calls are rejected at once with ``CircuitOpenError``, whose ``retry_after`` is the
    time left until the breaker turns half-open (``ErrorMiddleware`` answers it with a 503 and
    ``Retry-After``). After ``recovery_timeout`` the next caller finds it half-open: exactly
    ``half_open_max_calls`` trial calls are let through and the others rejected (with
    ``retry_after=0``: the wait is the trials' own, unknown); it closes once that many trials
    succeeded, and any failed trial opens it again for a full ``recovery_timeout`` (stricter
    than resilience4j, which judges the trials' failure rate).

    Outcomes: an ``Exception`` is a ``failure`` unless it is an instance of ``exclude`` (then
    ``excluded``: neither success nor failure, as resilience4j's ignored exceptions; a
    half-open permit is given back). A call still running ``timeout`` seconds after it started
    is cancelled (its deadline is the event loop's), like resilience4j's TimeLimiter, and the
    caller gets ``TimeoutError``; a call that returned but took longer than ``timeout`` by
    ``clock`` is returned to the caller and still recorded as slow. Both count as ``timeout``,
    a failure. A call cancelled from outside
    (the caller gave up) or ended by a ``BaseException`` says nothing about the dependency: it
    is not recorded, and its half-open permit is released, so the breaker never sticks in
    half-open. An outcome that arrives after the state changed (a call admitted while closed
    that ends after the breaker opened) is counted in metrics but does not move the state.

    Three ways to protect a call: ``@breaker`` on an ``async def``, ``async with breaker:``
    around a block, or ``await breaker.call(fn, *args, **kwargs)``.

    Metrics: ``asgi_resilience_circuit_breaker_state{breaker,state}`` is 1 for the
    current state and 0 for the other two, set at creation and on every transition (open turns
    half-open lazily, when a call, ``state`` or ``snapshot()`` finds the recovery elapsed);
    ``asgi_resilience_circuit_breaker_calls_total{breaker,outcome}`` counts ``success``,
    ``failure``, ``timeout``, ``excluded`` and ``rejected`` calls. Transitions are logged:
    opening as a warning, the others as info. Use a distinct ``name`` per breaker and registry.

    Args:
        name: names the dependency in errors, logs, metrics and ``/health/status``.
        failure_threshold: consecutive failures that open a closed breaker.
        recovery_timeout: seconds an open breaker rejects calls before trying again.
        half_open_max_calls: trial calls let through, and needed to succeed, when half-open.
        failure_rate_threshold: open on a failure rate (a fraction, ``0.5`` for 50%) over a
            sliding window of calls instead of on consecutive failures.
        window_size: the calls that window holds (count-based, like resilience4j's default).
        minimum_calls: calls recorded before the failure rate is judged.
        timeout: seconds after which a call is cancelled and counted as a failure.
        exclude: exception classes that are not failures (a 404 from the dependency).
        clock: monotonic seconds; injectable for tests.
        registry: the Prometheus registry (the global one by default).
        logger: where transitions are logged (``asgi_resilience.circuit_breaker``).
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        recovery_timeout: float = 30.0,
        half_open_max_calls: int = 1,
        failure_rate_threshold: float | None = None,
        window_size: int = 100,
        minimum_calls: int = 10,
        timeout: float | None = None,
        exclude: ExceptionTypes = (),
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty string naming the dependency ('payments')")
        require_count("failure_threshold", failure_threshold)
        require_count("half_open_max_calls", half_open_max_calls)
        require_count("window_size", window_size)
        require_count("minimum_calls", minimum_calls)
        require_seconds("recovery_timeout", recovery_timeout)
        if timeout is not None:
            require_seconds("timeout", timeout)
        if failure_rate_threshold is not None and not 0 < failure_rate_threshold <= 1:
            raise ValueError(
                "failure_rate_threshold must be a fraction in (0, 1], e.g. 0.5 for 50%, "
                f"got {failure_rate_threshold!r}"
            )
        if minimum_calls > window_size:
            raise ValueError(
                f"minimum_calls ({minimum_calls}) must be <= window_size ({window_size}), "
                "or the failure rate could never be judged"
            )
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.half_open_max_calls = half_open_max_calls
        self.failure_rate_threshold = failure_rate_threshold
        self.minimum_calls = minimum_calls
        self.timeout = timeout
        self.exclude = exception_types("exclude", exclude)
        self.clock = clock
        self.logger = logger if logger is not None else _logger
        self._state: BreakerState = "closed"
        self._generation = 0  # bumped by every transition; stale outcomes are told apart by it
        self._opened_at = 0.0
        self._consecutive = 0
        self._window: deque[bool] = deque(maxlen=window_size)  # True: a failure
        self._window_failures = 0
        self._trials = 0  # half-open permits held by calls in flight
        self._trial_successes = 0
        metrics = Metrics.for_registry(registry).feature(BreakerCollectors)
        self._gauges = {s: metrics.breaker_state.labels(name, s) for s in STATES}
        self._counters = {o: metrics.breaker_calls.labels(name, o) for o in OUTCOMES}
        self._set_gauges()

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state!r})"

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open`` or ``half_open`` (an open breaker whose recovery timeout
        elapsed turns half-open when this is read)."""
        return self._refresh(self.clock())

    def snapshot(self) -> dict[str, Any]:
        """The breaker as ``/health/status`` shows it: ``state``, ``retry_after`` (seconds
        until trial calls, when open), ``consecutive_failures``, ``failure_rate`` over the
        window (with ``failure_rate_threshold``) and ``half_open_calls`` in flight."""
        now = self.clock()
        state = self._refresh(now)
        calls = len(self._window)
        return {
            "state": state,
            "retry_after": round(self._time_left(now), 3) if state == "open" else None,
            "consecutive_failures": self._consecutive,
            "failure_rate": round(self._window_failures / calls, 4) if calls else None,
            "half_open_calls": self._trials,
        }

    def install(self, lifespan: Lifespan) -> None:
        """Show this breaker in ``lifespan``'s ``/health/status``, under ``circuit_breakers``
        (one section for all the breakers installed there, keyed by name).

        Raises:
            ValueError: another breaker with this name is installed there.
        """
        section = _sections.get(lifespan)
        if section is None:
            section = _sections[lifespan] = _StatusSection()
            lifespan.add_status(STATUS_SECTION, section.status)
        if section.breakers.setdefault(self.name, self) is not self:
            raise ValueError(
                f"a circuit breaker named {self.name!r} is already installed; name each "
                "dependency's breaker differently"
            )

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)`` through the breaker.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with every trial permit taken.
            TimeoutError: the call was cancelled after ``timeout`` seconds, or the current
                request's deadline (``TimeoutMiddleware``) has passed: then ``fn`` is not
                called, and nothing is counted against the dependency.
        """
        async with self:
            return await fn(*args, **kwargs)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` so that every call goes through the breaker."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"@{type(self).__name__} decorates async functions, not {fn!r}; "
                "use 'async with breaker:' around other awaitables"
            )

        @functools.wraps(fn)
        async def protected(*args: P.args, **kwargs: P.kwargs) -> T:
            async with self:
                return await fn(*args, **kwargs)

        return protected

    async def __aenter__(self) -> CircuitBreaker:
        left = remaining_time()
        if left is not None and left <= 0:  # before admitting: nothing counts against the call
            raise TimeoutError(f"the request's deadline passed before calling {self.name!r}")
        call = self._admit()
        _entered.set((*_entered.get(), call))
        if self.timeout is not None:
            call.scope = anyio.CancelScope(deadline=anyio.current_time() + self.timeout)
            call.scope.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entered = _entered.get()
        if not entered or entered[-1].breaker is not self:
            raise RuntimeError(f"{self!r} exited without being entered in this task")
        call = entered[-1]
        _entered.set(entered[:-1])
        timed_out = False
        try:
            if call.scope is not None:
                call.scope.__exit__(exc_type, exc, tb)
                timed_out = call.scope.cancelled_caught
        finally:
            self._finish(call, None if timed_out else exc, timed_out)
        if timed_out:
            raise TimeoutError(
                f"circuit breaker {self.name!r}: call cancelled after {self.timeout:g}s"
            )

    # -- the state machine: synchronous, so no other task runs in between ------------------

    def _refresh(self, now: float) -> BreakerState:
        if self._state == "open" and self._time_left(now) <= 0:
            self._transition("half_open", now, f"{self.recovery_timeout:g}s elapsed")
        return self._state

    def _time_left(self, now: float) -> float:
        return self._opened_at + self.recovery_timeout - now

    def _admit(self) -> _Call:
        now = self.clock()
        state = self._refresh(now)
        if state == "closed":
            return _Call(self, self._generation, False, now)
        if state == "half_open" and self._trials + self._trial_successes < self.half_open_max_calls:
            self._trials += 1
            return _Call(self, self._generation, True, now)
        self._counters["rejected"].inc()
        raise CircuitOpenError(self.name, self._time_left(now) if state == "open" else 0.0)

    def _finish(self, call: _Call, exc: BaseException | None, timed_out: bool) -> None:
        outcome = self._classify(call, exc, timed_out)
        if outcome is not None:
            self._counters[outcome].inc()
        if call.generation != self._generation:
            return  # admitted before the last transition: says nothing about the current state
        now = self.clock()
        if call.trial:
            self._trials -= 1
            if outcome in ("failure", "timeout"):
                self._transition("open", now, f"a trial call ended in {outcome}")
            elif outcome == "success":
                self._trial_successes += 1
                if self._trial_successes >= self.half_open_max_calls:
                    self._transition("closed", now, f"{self._trial_successes} trial calls passed")
        elif outcome in ("success", "failure", "timeout"):
            failed = outcome != "success"
            self._consecutive = self._consecutive + 1 if failed else 0
            if self.failure_rate_threshold is not None:
                if len(self._window) == self._window.maxlen:
                    self._window_failures -= self._window[0]
                self._window.append(failed)
                self._window_failures += failed
            reason = self._trip_reason()
            if reason is not None:
                self._transition("open", now, reason)

    def _classify(
        self, call: _Call, exc: BaseException | None, timed_out: bool
    ) -> CallOutcome | None:
        if timed_out:
            return "timeout"
        if exc is None:
            slow = self.timeout is not None and self.clock() - call.started > self.timeout
            return "timeout" if slow else "success"
        if not isinstance(exc, Exception):
            return None  # cancelled or interrupted: no verdict on the dependency
        return "excluded" if isinstance(exc, self.exclude) else "failure"

    def _trip_reason(self) -> str | None:
        if self.failure_rate_threshold is None:
            if self._consecutive >= self.failure_threshold:
                return f"{self._consecutive} consecutive failures"
            return None
        calls = len(self._window)
        rate = self._window_failures / calls if calls else 0.0
        if calls >= self.minimum_calls and rate >= self.failure_rate_threshold:
            return f"failure rate {rate:.0%} over the last {calls} calls"
        return None

    def _transition(self, state: BreakerState, now: float, reason: str) -> None:
        previous, self._state = self._state, state
        self._generation += 1
        self._opened_at = now
        self._consecutive = self._window_failures = self._trials = self._trial_successes = 0
        self._window.clear()
        self._set_gauges()
        self.logger.log(
            logging.WARNING if state == "open" else logging.INFO,
            "Circuit breaker %r %s -> %s: %s",
            self.name,
            previous,
            state,
            reason,
            extra={"breaker": self.name, "breaker_state": state},
        )

    def _set_gauges(self) -> None:
        for state, gauge in self._gauges.items():
            gauge.set(1 if state == self._state else 0)


class _StatusSection:
    """The ``circuit_breakers`` section of one lifespan's ``/health/status``."""

    def __init__(self) -> None:
        self.breakers: dict[str, CircuitBreaker] = {}

    async def status(self) -> dict[str, dict[str, Any]]:
        # Called on the event loop, as every status provider is (Lifespan.add_status): a breaker
        # belongs to its event loop's thread, and a snapshot never blocks.
        return {name: breaker.snapshot() for name, breaker in self.breakers.items()}


_sections: weakref.WeakKeyDictionary[Lifespan, _StatusSection] = weakref.WeakKeyDictionary()
