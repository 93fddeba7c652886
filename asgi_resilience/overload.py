"""Overload protection: concurrency limits with load shedding (fixed or adaptive), request
deadlines, body size limits. Each is off unless configured, answers in the stack's error shape,
and works alone (``app.add_middleware(...)``) or inside ``resilient()``.

Written here rather than taken from a library: uvicorn's ``--limit-concurrency`` is one global
limit with no queue, route or adaptation; Starlette has no request timeout; its body limit (1.6)
covers Starlette's own request parsing only, not other frameworks or raw ASGI apps.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from time import perf_counter
from typing import Any, Generic, Literal, TypeVar

import anyio
from prometheus_client import CollectorRegistry, Gauge

from ._checks import check_mapping
from .adaptive import AdaptiveLimit
from .context import (
    PROBE_PATHS,
    ContextMiddleware,
    PathSet,
    RequestContext,
    _deadline,
    get_deadline,
    path_matcher,
    remaining_time,
    route_path,
)
from .metrics import Metrics, collectors
from .problems import send_error
from .types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "OVERLOADED_TYPE",
    "AdaptiveLimit",
    "BodyLimitMiddleware",
    "ConcurrencyLimitMiddleware",
    "LoopLag",
    "TimeoutMiddleware",
    "get_deadline",
    "remaining_time",
]

_logger = logging.getLogger("asgi_resilience.overload")
# draft-ietf-httpapi-ratelimit-headers, "Temporary Reduced Capacity": the problem type for a
# service that refuses work it cannot do now.
OVERLOADED_TYPE = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
T = TypeVar("T")


@collectors
class OverloadCollectors:
    """The concurrency limit's, the heartbeat's and the deadlines' collectors."""

    def __init__(self, registry: CollectorRegistry, request_path: Any) -> None:
        self.concurrency_limit = request_path.Gauge(
            "asgi_resilience_concurrency_limit",
            "Requests the concurrency limit lets in at once (adaptive: its current value).",
            [],
            registry=registry,
        )
        self.concurrency_in_flight = request_path.Gauge(
            "asgi_resilience_concurrency_in_flight",
            "Requests inside the concurrency limit now.",
            [],
            registry=registry,
        )
        # Set by the heartbeat, not per request; across workers the most behind one counts.
        self.event_loop_lag = Gauge(
            "asgi_resilience_event_loop_lag_seconds",
            "How late the event loop ran its last heartbeat (the concurrency limit's max_lag).",
            [],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.load_shed = request_path.Counter(
            "asgi_resilience_load_shed",
            "Requests refused by the concurrency limit (503), by reason.",
            ["reason"],
            registry=registry,
        )
        self.request_timeouts = request_path.Counter(
            "asgi_resilience_request_timeouts",
            "Requests cut off at their deadline: before the response started (504) or during it.",
            ["phase"],
            registry=registry,
        )


class _ByRoute(Generic[T]):
    """A value per route template or path prefix (first match wins), ``default`` elsewhere."""

    def __init__(self, default: T, routes: Mapping[str, T] | None, check: Callable[[str, T], T]):
        check_mapping("routes", routes)
        self.default = check("the default", default)
        self.routes = tuple(
            (path_matcher(route), check(f"routes[{route!r}]", value))
            for route, value in (routes or {}).items()
        )

    def __call__(self, path: str) -> T:
        for matches, value in self.routes:
            if matches(path):
                return value
        return self.default


def _seconds(name: str) -> Callable[[str, Any], float | None]:
    def check(where: str, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} ({where}) must be a number of seconds > 0, got {value!r}")
        return float(value)

    return check


# --- deadlines ------------------------------------------------------------------------------------


class TimeoutMiddleware(ContextMiddleware):
    """A deadline per request: the application is cancelled when it passes.

    Handles ``http`` scopes; WebSocket and lifespan pass through. The deadline counts from the
    moment the stack saw the request (queueing behind a concurrency limit counts against it).
    If the application has not started its response by then, it is cancelled (its ``finally``
    blocks run) and the client gets 504 ``code="timeout"``; a response already started is cut
    off (the connection is closed), logged once and counted. Inside the request
    ``get_deadline()`` and ``remaining_time()`` tell the time left; ``retry()``,
    ``CircuitBreaker.call`` and ``Database`` on PostgreSQL respect it. Counted in
    ``asgi_resilience_request_timeouts_total{phase}`` (``before_response``,
    ``during_response``). Place it outside the rate and concurrency limits.

    Args:
        app: the ASGI application.
        timeout: seconds a request may take; ``None``: no deadline but where ``routes`` say.
        routes: route template (``"/reports/{id}"``) or path prefix -> seconds (``None``: no
            deadline there); first match wins.
        registry: the Prometheus registry.
        logger: where cut-off responses are reported (``asgi_resilience.overload``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeout: float | None = 30.0,
        routes: Mapping[str, float | None] | None = None,
        registry: CollectorRegistry | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.timeout_for = _ByRoute(timeout, routes, _seconds("timeout"))
        metrics = Metrics.for_registry(registry).feature(OverloadCollectors)
        self._before = metrics.request_timeouts.labels("before_response")
        self._during = metrics.request_timeouts.labels("during_response")
        self.logger = logger if logger is not None else _logger

    async def handle(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        timeout = self.timeout_for(route_path(scope))
        if timeout is None:
            await self.app(scope, receive, send)
            return
        # From when the stack saw the request: the context's start, on anyio's clock.
        deadline = anyio.current_time() + timeout - (perf_counter() - context.start)
        outer = _deadline.get()
        if outer is not None and outer < deadline:
            deadline = outer  # an outer deadline that is sooner still holds
        started = False
        cancel_scope = anyio.CancelScope(deadline=deadline)

        async def send_watching_the_response(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                # Answered: background work after the response is not held to the deadline.
                cancel_scope.deadline = math.inf

        token = _deadline.set(deadline)
        try:
            with cancel_scope:
                await self.app(scope, receive, send_watching_the_response)
        finally:
            _deadline.reset(token)
        if not cancel_scope.cancelled_caught:
            return
        if not started:
            self._before.inc()
            detail = f"The request did not complete within {timeout:g} s"
            await send_error(context, scope, send, 504, detail=detail, code="timeout")
            return
        self._during.inc()
        self.logger.warning(
            "Response cut off at its deadline: %s %s after %g s",
            scope["method"],
            scope["path"],
            timeout,
        )
        error = TimeoutError(f"the response was cut off at its {timeout:g} s deadline")
        context.mark_logged(error)  # logged here: the error layer only passes it on
        context.exception_reported = error  # a deadline, not a fault for error reporters
        raise error


# --- body size ------------------------------------------------------------------------------------


def _size(name: str) -> Callable[[str, Any], int | None]:
    def check(where: str, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{name} ({where}) must be a whole number of bytes >= 0, got {value!r}"
            )
        return value

    return check


class BodyLimitMiddleware(ContextMiddleware):
    """Refuse request bodies larger than a limit with 413 ``code="payload_too_large"``.

    Handles ``http`` scopes; others pass through. A ``Content-Length`` above the limit is
    refused before the application runs. A body without one (chunked) is counted as the
    application reads it: once it passes the limit the application reads ``http.disconnect``,
    whatever it sends afterwards is dropped, and the client gets 413 (if no response started).

    Args:
        app: the ASGI application.
        max_body_size: bytes a request body may have; ``None``: no limit but where ``routes``
            say.
        routes: route template or path prefix -> bytes (``None``: no limit there).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_size: int | None = 1_048_576,
        routes: Mapping[str, int | None] | None = None,
    ) -> None:
        self.app = app
        self.limit_for = _ByRoute(max_body_size, routes, _size("max_body_size"))

    async def handle(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        limit = self.limit_for(route_path(scope))
        if limit is None:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    break  # servers refuse a malformed length; count the bytes instead
                if declared > limit:
                    await self._send_413(context, scope, send, limit)
                    return
                break
        responder = _BodyCounter(receive, send, limit)
        try:
            await self.app(scope, responder.receive, responder.send)
        except Exception:
            if not responder.exceeded:
                raise
            # The app failed on the disconnect it was given (Starlette's ClientDisconnect).
        if responder.exceeded and not responder.started:
            await self._send_413(context, scope, send, limit)

    async def _send_413(
        self, context: RequestContext, scope: Scope, send: Send, limit: int
    ) -> None:
        detail = f"The request body is larger than {limit} bytes"
        await send_error(context, scope, send, 413, detail=detail, code="payload_too_large")


class _BodyCounter:
    """The receive and send of one request under a body limit."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self.received = 0
        self.exceeded = False
        self.started = False

    async def receive(self) -> Message:
        if self.exceeded:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.exceeded = True
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.exceeded and not self.started:
            return  # the 413 is ours to send
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


# --- concurrency ----------------------------------------------------------------------------------


class LoopLag:
    """How far behind its schedule the event loop runs: the wait a request has had before any
    middleware saw it.

    A concurrency limit counts the requests inside it, but under overload the queue that
    grows is the one in front of it: bytes in socket buffers and requests whose tasks the loop
    has not run yet (a handler that computes, a blocking call, threads holding the GIL). A
    heartbeat every ``interval`` seconds measures how late it fires; while a beat is overdue,
    the time since it was due counts too, so a loop stuck in one long step is seen from inside
    that step. The idea of ``toobusy-js`` and Fastify's ``under-pressure``
    (``maxEventLoopDelay``); written here because no ASGI library measures it. Runs on asyncio
    (a timer, no task) and trio (a system task); started by the first request of each loop,
    which stops the previous loop's heartbeat and drops its reading. One event loop at a time:
    an app served by loops in several threads at once needs one middleware per loop.

    Args:
        interval: seconds between beats.
        gauge: an ``asgi_resilience_event_loop_lag_seconds`` child set at each beat.
    """

    def __init__(self, interval: float = 0.005, gauge: Any = None) -> None:
        self.interval = interval
        self.gauge = gauge
        self.measured = 0.0
        self._due = math.inf  # when the next beat should fire, on the loop's clock
        self._loop: Any = None  # the asyncio loop or trio root task beating now
        self._handle: Any = None  # the asyncio timer of the next beat
        self._time: Callable[[], float] = anyio.current_time

    def __call__(self) -> float:
        """Seconds the loop is behind now (0.0 before the first beat)."""
        overdue = self._time() - self._due
        return overdue if overdue > self.measured else self.measured

    def ensure_running(self) -> None:
        """Start beating on the running loop unless already beating there (once per request:
        the check is one lookup of the running loop)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: anyio's other backend, trio
            import trio

            loop: object = trio.lowlevel.current_root_task()
            if loop is self._loop:
                return
            self._restart(loop, trio.current_time)
            trio.lowlevel.spawn_system_task(self._trio_beats)
            return
        if running is self._loop:
            return
        self._restart(running, running.time)
        self._handle = running.call_at(self._due, self._asyncio_beat, running)

    def _restart(self, loop: Any, clock: Callable[[], float]) -> None:
        """Beat on ``loop`` from now: the previous loop's chain stops, its reading is dropped."""
        if self._handle is not None:
            self._handle.cancel()  # a loop revisited later must not get a second chain
            self._handle = None
        self._loop = loop
        self._time = clock
        self._due = clock() + self.interval
        self._record_value(0.0)

    def _record(self, now: float) -> None:
        late = max(0.0, now - self._due)
        self._due = now + self.interval
        self._record_value(late)

    def _record_value(self, value: float) -> None:
        self.measured = value
        if self.gauge is not None:
            self.gauge.set(value)

    def _asyncio_beat(self, loop: Any) -> None:
        if loop is not self._loop:
            return  # a newer loop took over
        self._record(loop.time())
        self._handle = loop.call_at(self._due, self._asyncio_beat, loop)

    async def _trio_beats(self) -> None:
        import trio

        root = trio.lowlevel.current_root_task()
        while root is self._loop:
            await trio.sleep_until(self._due)
            self._record(trio.current_time())


_SHED_REASONS = ("queue_full", "queue_timeout", "loop_lag")


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class ConcurrencyLimitMiddleware(ContextMiddleware):
    """At most ``limit`` requests inside at once; a bounded queue; the rest shed with 503.

    Handles ``http`` scopes (WebSockets and lifespan pass through, not counted). A request
    that finds every place taken waits in a queue of at most ``max_queue``, first come first
    served, for at most ``queue_timeout`` seconds; a full queue or a wait that runs out is
    answered at once with 503 ``code="overloaded"``, the IETF "temporary reduced capacity"
    problem type and ``Retry-After`` (``queue_timeout`` rounded up: by then a place may be
    free). A waiter whose client disconnects, or whose task is cancelled, leaves the queue.
    ``exempt_paths`` (probes and ``/metrics`` by default) are never limited. With
    ``limit="adaptive"`` the limit follows measured latency (``AdaptiveLimit``).

    The queue that grows first under overload is often in front of any middleware: requests
    the event loop has not reached yet (a handler computing on the loop, a blocking call,
    threads holding the GIL). While the loop runs more than ``max_lag`` seconds behind
    (``LoopLag``), new requests are shed at once, cheaply, instead of being admitted after a
    wait they could not see: without it, a service whose handlers compute on the loop is never
    more than one request "in flight" and the limit never sheds while its clients time out.

    Metrics: ``asgi_resilience_concurrency_limit``, ``asgi_resilience_concurrency_in_flight``,
    ``asgi_resilience_event_loop_lag_seconds``, ``asgi_resilience_load_shed_total{reason}``
    (``queue_full``, ``queue_timeout``, ``loop_lag``).

    Args:
        app: the ASGI application.
        limit: requests inside at once, or ``"adaptive"``.
        max_queue: requests that may wait (default: as many as the limit, the adaptive
            limit's current value included); 0: none wait.
        queue_timeout: seconds a request may wait.
        max_lag: seconds the event loop may run behind before new requests are shed
            (``loop_lag``); ``None``: not watched. The default, 0.1 s, is past a garbage
            collection's pause and well short of a client's patience.
        min_limit: the adaptive limit's floor (and its starting point's lower bound).
        max_limit: the adaptive limit's ceiling.
        exempt_paths: paths (and their subpaths) never limited.
        registry: the Prometheus registry.
        clock: seconds, monotonic, for the adaptive limit's latency samples (tests).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int | Literal["adaptive"] = 100,
        max_queue: int | None = None,
        queue_timeout: float = 1.0,
        min_limit: int = 1,
        max_limit: int = 1000,
        max_lag: float | None = 0.1,
        exempt_paths: Iterable[str] = PROBE_PATHS,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        for name, value in (("min_limit", min_limit), ("max_limit", max_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if min_limit > max_limit:
            raise ValueError(f"min_limit ({min_limit}) must not exceed max_limit ({max_limit})")
        self.adaptive: AdaptiveLimit | None = None
        if limit == "adaptive":
            self.adaptive = AdaptiveLimit(min_limit=min_limit, max_limit=max_limit)
            self.limit = self.adaptive.limit
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a whole number >= 1 or 'adaptive', got {limit!r}")
        else:
            self.limit = limit
        if max_queue is not None and (
            isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0
        ):
            raise ValueError(f"max_queue must be a whole number >= 0, got {max_queue!r}")
        _seconds("queue_timeout")("the option", queue_timeout)
        self.app = app
        self._max_queue = max_queue  # None: as many as the limit, adaptive or not
        self.queue_timeout = float(queue_timeout)
        self.retry_after = b"%d" % max(1, math.ceil(queue_timeout))
        self.exempt = PathSet(exempt_paths, option="exempt_paths")
        self.clock = clock if clock is not None else anyio.current_time
        self.in_flight = 0
        self._waiters: deque[_Waiter] = deque()
        metrics = Metrics.for_registry(registry).feature(OverloadCollectors)
        every = Metrics.for_registry(registry)
        self._limit_gauge = every.child(metrics.concurrency_limit)
        self._in_flight_gauge = every.child(metrics.concurrency_in_flight)
        self._shed = {r: metrics.load_shed.labels(r) for r in _SHED_REASONS}
        _seconds("max_lag")("the option", max_lag)
        self.max_lag = max_lag
        self.lag = None if max_lag is None else LoopLag(gauge=metrics.event_loop_lag)
        self._limit_gauge.set(self.limit)
        self._in_flight_gauge.set(0)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def max_queue(self) -> int:
        """Requests that may wait now: ``max_queue``, or the current limit without one."""
        return self.limit if self._max_queue is None else self._max_queue

    async def handle(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if route_path(scope) in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.lag is not None:
            self.lag.ensure_running()
            if self.lag() > self.max_lag:  # type: ignore[operator]
                await self._shed_request(context, scope, send, "loop_lag")
                return
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
        else:
            if len(self._waiters) >= self.max_queue:
                await self._shed_request(context, scope, send, "queue_full")
                return
            receive, outcome = await self._wait(receive)
            if outcome == "gone":
                context.mark_disconnected()  # nobody to answer
                return
            if outcome == "timeout":
                await self._shed_request(context, scope, send, "queue_timeout")
                return
        self._in_flight_gauge.set(self.in_flight)
        started = self.clock()
        try:
            await self.app(scope, receive, send)
        finally:
            if self.adaptive is not None:
                self._sample(self.clock() - started)
            self._release()

    async def _wait(self, receive: Receive) -> tuple[Receive, str]:
        """Queue for a place, watching the client meanwhile: the receive to hand the app (it
        replays what was read while waiting) and the outcome, ``"granted"``, ``"timeout"`` or
        ``"gone"`` (the client disconnected)."""
        waiter = _Waiter()
        self._waiters.append(waiter)
        buffered: list[Message] = []
        gone = False

        async def watch_client(cancel_scope: anyio.CancelScope) -> None:
            nonlocal gone
            size = 0
            while size <= 65_536:  # beyond that the app reads the rest, and any disconnect
                try:
                    message = await receive()
                except Exception:  # the server lost the connection: as good as a disconnect
                    message = {"type": "http.disconnect"}
                buffered.append(message)
                if message["type"] == "http.disconnect":
                    gone = True
                    cancel_scope.cancel()
                    return
                size += len(message.get("body", b""))

        try:
            with anyio.move_on_after(self.queue_timeout):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(watch_client, tasks.cancel_scope)
                    await waiter.event.wait()
                    tasks.cancel_scope.cancel()
        except BaseException:
            self._leave(waiter)
            raise
        if gone or not waiter.granted:
            self._leave(waiter)
            return receive, "gone" if gone else "timeout"

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        return replay, "granted"

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter goes: out of the queue, or, granted a place meanwhile, handing it on."""
        if waiter.granted:
            self._release()
        else:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def _release(self) -> None:
        self.in_flight -= 1
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        """Give the free places to the longest waiting (each keeps its place in flight)."""
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self.in_flight += 1
            waiter.event.set()
        self._in_flight_gauge.set(self.in_flight)

    def _sample(self, latency: float) -> None:
        assert self.adaptive is not None
        self.adaptive.observe(latency, self.in_flight)
        if self.adaptive.limit != self.limit:
            self.limit = self.adaptive.limit
            self._limit_gauge.set(self.limit)
            self._admit_waiters()  # a higher limit lets waiters in now

    async def _shed_request(
        self, context: RequestContext, scope: Scope, send: Send, reason: str
    ) -> None:
        self._shed[reason].inc()
        if reason == "queue_full":
            detail = "The service is at capacity and its queue is full; retry later"
        elif reason == "queue_timeout":
            detail = f"No capacity came free within {self.queue_timeout:g} s; retry later"
        else:
            detail = "The service is running behind its incoming requests; retry later"
        await send_error(
            context,
            scope,
            send,
            503,
            detail=detail,
            code="overloaded",
            problem_type=OVERLOADED_TYPE,
            headers=[(b"retry-after", self.retry_after)],
        )
