"""``Lifespan``: the state machine and the public interface; the jobs live beside it.

``Lifespan`` is used three ways: as a Starlette/FastAPI lifespan (``Starlette(lifespan=ls)``), as a
layer around any ASGI app (``ls.wrap(app)``, which ``resilient()`` does), or driven directly
(``await ls.startup()`` / ``await ls.shutdown()``, as the CLI's ``check`` does).

States: ``idle`` -> ``starting`` -> ``ready`` -> ``draining`` (SIGTERM) -> ``stopping`` ->
``stopped``; a failed startup ends in ``failed``.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from time import monotonic, perf_counter
from typing import Any, Literal, TypeVar, get_args

import anyio
import anyio.from_thread
import anyio.lowlevel
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .._checks import check_logger, check_name, check_seconds
from ..calls import describe_error
from ..exceptions import StartupError
from ..metrics import Metrics, collectors
from ..types import ASGIApp
from ._checks import Check, CheckFunction, CheckResult, CheckRunner
from ._drain import SigtermWatch
from ._exit import exit_soon
from ._faults import FaultWatch, OnUnhandled
from ._process import process_facts
from ._resources import ResourceFactory, ResourceOutcome, ResourceReport, Resources
from ._tasks import Task, TaskFunction, TaskReport, Tasks

__all__ = ["STARTABLE", "Lifespan", "LifespanState"]

_logger = logging.getLogger("asgi_resilience.lifespan")

LifespanState = Literal["idle", "starting", "ready", "draining", "stopping", "stopped", "failed"]
STARTABLE = frozenset({"idle", "stopped", "failed"})  # states startup() starts from
# Past shutdown_timeout, what is left to close shares one more second; then the process exits.
_LAST_SECOND = 1.0
F = TypeVar("F", bound=Callable[..., Any])
_SHUTDOWN_OUTCOMES = get_args(ResourceOutcome)
_FAULT_SOURCES = ("task", "thread")  # FaultWatch's: an asyncio task's, a thread's


@collectors
class LifespanCollectors:
    """What startup and shutdown report to Prometheus."""

    def __init__(self, registry: CollectorRegistry, request_path: Any) -> None:
        self.startup_checks = Histogram(
            "asgi_resilience_startup_check_duration_seconds",
            "Duration of startup checks.",
            ["check", "outcome"],
            registry=registry,
        )
        self.shutdown_resources = Histogram(
            "asgi_resilience_shutdown_resource_duration_seconds",
            "Duration of closing each resource at shutdown.",
            ["resource", "outcome"],
            registry=registry,
        )
        self.task_up = Gauge(
            "asgi_resilience_task_up",
            "1 while the background task is running, else 0 (crashed, stopped, finished).",
            ["task"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.task_restarts = Counter(
            "asgi_resilience_task_restarts",
            "Restarts of background tasks after a crash.",
            ["task"],
            registry=registry,
        )
        self.unhandled_exceptions = Counter(
            "asgi_resilience_unhandled_exceptions",
            "Exceptions nobody handled: left in an asyncio task, or ending a thread.",
            ["source"],
            registry=registry,
        )

    def expect(self, resources: Iterable[str], tasks: Iterable[str]) -> None:
        """Export the rare counts at 0 for the labels known before they first count: each
        resource's shutdown outcomes, each task's restarts, both sources of unhandled
        exceptions. Prometheus' ``increase()`` and ``rate()`` see no increase in a series whose
        first sample is already 1 (a first shutdown, a first crash), only in one that was 0."""
        for resource in resources:
            for outcome in _SHUTDOWN_OUTCOMES:
                self.shutdown_resources.labels(resource, outcome)
        for task in tasks:
            self.task_restarts.labels(task)
        for source in _FAULT_SOURCES:
            self.unhandled_exceptions.labels(source)


class Lifespan:
    """Startup checks, resources and draining for one ASGI application.

    Startup: open resources in registration order, run every check concurrently (each under its
    own timeout, retried ``attempts`` times with exponential backoff), then, when wrapping an
    app, the app's own lifespan startup. A critical check that fails or a resource that cannot
    be opened fails startup with a message naming each failure and why (the server gets
    ``lifespan.startup.failed``; uvicorn exits non-zero), after closing whatever was already
    opened. Non-critical failures are logged and the application starts degraded.

    SIGTERM (handled when started in the main thread): the state becomes ``draining`` at once,
    so ``/health/ready`` answers 503, while the server keeps serving for ``drain_delay``
    seconds; then the server's own SIGTERM handler runs (chained, not replaced) and its shutdown
    proceeds. A second SIGTERM hands over at once.

    Background tasks (``add_task``/``@task``) start once startup succeeded (the wrapped app's
    own startup included) and are supervised: see ``add_task``.

    Shutdown: wait up to ``drain_timeout`` seconds for in-flight requests (counted by
    ``wrap``), cancel the tasks (each gets its ``timeout`` to finish), run the wrapped app's own
    lifespan shutdown, then close resources in reverse order, each under its own timeout,
    failures isolated. Tasks and resources together get ``shutdown_timeout``; each step runs in
    a task of its own, waited for shielded from the server's cancellation, and one still running
    past its time (it may shield itself around a hung call) is abandoned so the next can go on.
    ``task_report`` and ``shutdown_report`` name each task and resource with its outcome and
    duration; both are logged. When a SIGTERM began the shutdown and something had to be
    abandoned, the process exits (status 1) half a second after the shutdown ends if it has not
    exited by then: an abandoned task would otherwise keep the event loop, and the process,
    from ever ending. A second shutdown does nothing.

    Process faults, while it runs: an exception left in an asyncio task nobody awaited, or one
    ending a thread, is logged once with its traceback (and the request id when raised inside a
    request) and counted; ``on_unhandled="shutdown"`` then begins a graceful shutdown, as
    SIGTERM does.

    Args:
        startup_timeout: seconds for the whole startup (resources and checks).
        shutdown_timeout: seconds for stopping the background tasks and closing all resources
            (past it, what is left to close shares one more second).
        drain_delay: seconds between SIGTERM and handing over to the server's shutdown; make it
            as long as your load balancer takes to stop routing to a pod that is not ready.
        drain_timeout: seconds shutdown waits for in-flight requests.
        logger: where startup and shutdown are reported (``asgi_resilience.lifespan``).
        registry: the Prometheus registry for check and shutdown durations (the global one
            by default; ``resilient(registry=...)`` sets it when left unset).
        on_unhandled: ``"log"`` (log and count unhandled exceptions) or ``"shutdown"`` (also
            begin a graceful shutdown: a process with an unknown fault is replaced).
    """

    def __init__(
        self,
        *,
        startup_timeout: float = 30,
        shutdown_timeout: float = 25,
        drain_delay: float = 0,
        drain_timeout: float = 20,
        logger: logging.Logger | None = None,
        registry: CollectorRegistry | None = None,
        on_unhandled: OnUnhandled = "log",
    ) -> None:
        self.startup_timeout = check_seconds("startup_timeout", startup_timeout)
        self.shutdown_timeout = check_seconds("shutdown_timeout", shutdown_timeout)
        self.drain_delay = check_seconds("drain_delay", drain_delay, zero=True)
        self.drain_timeout = check_seconds("drain_timeout", drain_timeout)
        check_logger("logger", logger)
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise ValueError(
                f"registry must be a prometheus_client CollectorRegistry or None, got {registry!r}"
            )
        if on_unhandled not in ("log", "shutdown"):
            raise ValueError(f"on_unhandled must be 'log' or 'shutdown', got {on_unhandled!r}")
        self.on_unhandled: OnUnhandled = on_unhandled
        self.logger = logger if logger is not None else _logger
        self.registry = registry
        self.state: LifespanState = "idle"
        # True while trial_startup() runs: a resource may skip what only a serving process
        # needs (the management listener binds no port for asgi-resilience check).
        self.trial = False
        self.checks: dict[str, Check] = {}
        self.startup_results: dict[str, CheckResult] = {}
        self.shutdown_report: list[ResourceReport] = []
        self.task_report: list[TaskReport] = []
        self.values: dict[str, Any] = {}
        self.started_at: float | None = None
        self.in_flight = 0
        self.users = 0  # stacks (LifespanMiddleware) running this lifespan now
        self._resources = Resources()
        self._status_providers: dict[str, Callable[[], Any]] = {}
        self._runner = CheckRunner(self)
        self._sigterm = SigtermWatch(self)
        self._tasks = Tasks(self, lambda: self.metrics.feature(LifespanCollectors))
        self._faults = FaultWatch(
            self, lambda: self.metrics.feature(LifespanCollectors).unhandled_exceptions
        )
        self._shutdown_deadline = 0.0
        self._loop_token: Any = None  # the event loop it runs in, for other threads
        # While a shutdown waits for the requests in flight: set by the ASGI layer when the
        # last one ends. None otherwise (reset at each start: an event belongs to one loop).
        self.drained: anyio.Event | None = None
        # Set when the drain delay ends (or the shutdown begins without one): long-lived
        # connections (WebSocket sessions) close then. Made at each start, in its event loop.
        self.going_away: anyio.Event | None = None

    @property
    def resource_names(self) -> list[str]:
        """The registered resources, in registration order."""
        return self._resources.names

    @property
    def status_names(self) -> list[str]:
        """The sections ``add_status`` added to ``/health/status``, in order."""
        return list(self._status_providers)

    @property
    def metrics(self) -> Metrics:
        """The Prometheus collectors this lifespan (and its health endpoints) report to."""
        return Metrics.for_registry(self.registry)

    # -- registration ----------------------------------------------------------------------

    def add_check(
        self,
        name: str,
        function: CheckFunction,
        *,
        timeout: float = 5.0,
        critical: bool = True,
        readiness: bool = True,
        attempts: int = 1,
    ) -> Check:
        """Register a check: a sync or async callable that raises (or returns ``False``) when
        its dependency is unusable. Sync callables run in a worker thread.

        Args:
            name: unique name, shown in errors, logs and ``/health/ready``.
            function: the check.
            timeout: seconds for one attempt.
            critical: a failure fails startup and readiness; otherwise it is only reported.
            readiness: run it again for ``/health/ready``.
            attempts: tries at startup, with exponential backoff between them.
        """
        check_name("a check's name", name)
        if name in self.checks:
            raise ValueError(f"a check named {name!r} is already registered")
        if not callable(function):
            raise ValueError(f"check {name!r}: function must be callable, got {function!r}")
        timeout = check_seconds(f"check {name!r}: timeout", timeout)
        for option, value in (("critical", critical), ("readiness", readiness)):
            if not isinstance(value, bool):
                raise ValueError(f"check {name!r}: {option} must be True or False, got {value!r}")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(
                f"check {name!r}: attempts must be a whole number >= 1, got {attempts!r}"
            )
        check = Check(name, function, timeout, critical, readiness, attempts)
        self.checks[name] = check
        return check

    def check(
        self,
        name: str,
        *,
        timeout: float = 5.0,
        critical: bool = True,
        readiness: bool = True,
        attempts: int = 1,
    ) -> Callable[[F], F]:
        """Decorator form of ``add_check``."""

        def register(function: F) -> F:
            self.add_check(
                name,
                function,
                timeout=timeout,
                critical=critical,
                readiness=readiness,
                attempts=attempts,
            )
            return function

        return register

    def resource(
        self, name: str, *, timeout: float = 5.0
    ) -> Callable[[ResourceFactory], ResourceFactory]:
        """Decorate an async generator function: the code before ``yield value`` opens the
        resource at startup, the code after it closes it at shutdown, under ``timeout``. The
        value lands in the lifespan state: handlers read it as ``request.state.<name>``.
        """

        def register(factory: ResourceFactory) -> ResourceFactory:
            if not inspect.isasyncgenfunction(factory):
                raise ValueError(
                    f"resource {name!r} must be an async generator function (async def with "
                    f"yield), got {factory!r}"
                )
            self._register(name, timeout, factory=factory)
            return factory

        return register

    def add_resource(self, name: str, close: Callable[[], Any], *, timeout: float = 5.0) -> None:
        """Register an object created elsewhere: ``close`` (sync or async) runs at shutdown."""
        if not callable(close):
            raise ValueError(f"resource {name!r}: close must be callable, got {close!r}")
        self._register(name, timeout, close=close)

    def add_status(self, name: str, provider: Callable[[], Any]) -> None:
        """Add a section to ``/health/status`` (pool statistics, breaker states): ``provider``
        (sync or async) returns a JSON-serialisable value. A sync one is called in the event
        loop: it must not block."""
        check_name("a status section's name", name)
        if not callable(provider):
            raise ValueError(
                f"status section {name!r}: provider must be callable, got {provider!r}"
            )
        self._status_providers[name] = provider

    def add_task(
        self,
        name: str,
        function: TaskFunction,
        *,
        every: float | None = None,
        critical: bool = False,
        restart: bool = True,
        timeout: float = 5.0,
    ) -> Task:
        """Register a background task: ``async def function()``, started once startup
        succeeded, supervised until shutdown.

        With ``every``, it is called every ``every`` seconds (at a fixed rate from each run's
        start, never overlapping: a slow run delays the next, missed runs are skipped);
        without, it runs until shutdown (returning ends it: it is not restarted). A crash is
        logged once with its traceback and restarted after 0.5 s, doubling up to 60 s
        (``asgi_resilience_task_restarts_total``); ``restart=False`` leaves it stopped.
        ``/health/status`` shows it (``running``, ``restarts``, ``last_error``, ``last_run``)
        and ``asgi_resilience_task_up`` follows it. At shutdown, after the drain, every task is
        cancelled and gets ``timeout`` seconds to finish (the resources it uses are still
        open); one that ignores the cancellation is abandoned and reported.

        Args:
            name: unique name, in logs, metrics and ``/health/status``.
            function: an async function taking no arguments (run blocking work in it with
                ``anyio.to_thread.run_sync``).
            every: seconds between runs; ``None``: a long-running task.
            critical: while it is not running (crashed and waiting to restart, stopped,
                finished), ``/health/ready`` answers 503.
            restart: restart it after a crash.
            timeout: seconds it gets to finish once cancelled at shutdown.
        """
        check_name("a task's name", name)
        if self.state not in STARTABLE:
            raise RuntimeError(
                f"add task {name!r} before the lifespan starts (it is {self.state}): tasks "
                "start with the lifespan"
            )
        if name in self._tasks.registered:
            raise ValueError(f"a task named {name!r} is already registered")
        if not inspect.iscoroutinefunction(function):
            raise ValueError(
                f"task {name!r}: function must be an async function (async def) taking no "
                f"arguments, got {function!r}; run blocking work inside it with "
                "anyio.to_thread.run_sync"
            )
        if every is not None:
            every = check_seconds(f"task {name!r}: every", every)
        for option, value in (("critical", critical), ("restart", restart)):
            if not isinstance(value, bool):
                raise ValueError(f"task {name!r}: {option} must be True or False, got {value!r}")
        timeout = check_seconds(f"task {name!r}: timeout", timeout)
        task = Task(name, function, every, critical, restart, timeout)
        self._tasks.add(task)
        return task

    def task(
        self,
        name: str,
        *,
        every: float | None = None,
        critical: bool = False,
        restart: bool = True,
        timeout: float = 5.0,
    ) -> Callable[[F], F]:
        """Decorator form of ``add_task``."""

        def register(function: F) -> F:
            self.add_task(
                name, function, every=every, critical=critical, restart=restart, timeout=timeout
            )
            return function

        return register

    @property
    def task_names(self) -> list[str]:
        """The registered background tasks, in registration order."""
        return list(self._tasks.registered)

    @property
    def tasks_down(self) -> list[str]:
        """The critical tasks not running now (what makes ``/health/ready`` answer 503)."""
        return self._tasks.down() if self.state in ("ready", "draining") else []

    def _register(
        self,
        name: str,
        timeout: float,
        *,
        close: Callable[[], Any] | None = None,
        factory: ResourceFactory | None = None,
    ) -> None:
        check_name("a resource's name", name)
        if name in self._resources.names:
            raise ValueError(f"a resource named {name!r} is already registered")
        timeout = check_seconds(f"resource {name!r}: timeout", timeout)
        self._resources.register(name, timeout, close, factory)

    # -- startup ---------------------------------------------------------------------------

    async def startup(self) -> None:
        """Open resources, run the checks, install the SIGTERM handler; a no-op while started,
        a fresh start after a shutdown or a failed startup.

        Raises:
            StartupError: a critical check failed, a resource could not be opened, or the
                whole took longer than ``startup_timeout``.
        """
        if self.state in STARTABLE:
            await self.begin_startup()
            self.finish_startup()

    async def trial_startup(self) -> None:
        """Open the resources and run the startup checks, then close the resources: no task
        started, no signal or fault watched (what ``asgi-resilience check`` does).

        Raises:
            StartupError: as ``startup()``.
        """
        self.trial = True
        try:
            await self.begin_startup()
            await self.abort_startup()
        finally:
            self.trial = False
        self.state = "stopped"

    # -- the phases, as the ASGI layer (LifespanMiddleware) and startup()/shutdown() run them --

    async def begin_startup(self) -> None:
        """Open the resources and run the startup checks (state ``starting``); from idle, or
        again after a stop or a failure (a test client per test, a restart).

        Raises:
            StartupError: as ``startup()``; the state is then ``failed``.
            RuntimeError: the lifespan is starting or running already.
        """
        if self.state not in STARTABLE:
            raise RuntimeError(f"cannot start a lifespan that is {self.state}")
        self.drained = None
        self.going_away = anyio.Event()
        self._loop_token = anyio.lowlevel.current_token()
        self.values.clear()
        self.startup_results = {}
        self.shutdown_report = []
        self.task_report = []
        self.started_at = None
        self.state = "starting"
        self.metrics.feature(LifespanCollectors).expect(self.resource_names, self.task_names)
        began = perf_counter()
        finished: dict[str, CheckResult] = {}
        try:
            with anyio.fail_after(self.startup_timeout):
                await self._resources.open(self.values)
                results = await self.run_checks(startup=True, into=finished)
            self.startup_results = results
            self._observe_checks(results)
            failures = tuple(r for r in results.values() if not r.ok and r.critical)
            if failures:
                reasons = "; ".join(f"check {r.name!r} failed: {r.error}" for r in failures)
                raise StartupError(f"startup failed: {reasons}", failures)
        except BaseException as exc:
            # Failed, timed out, or cancelled by the server: close what was opened either way.
            await self._close_resources(self.shutdown_timeout)
            self.state = "failed"
            if not isinstance(exc, (StartupError, TimeoutError)):
                raise
            if isinstance(exc, TimeoutError):
                self.startup_results = dict(finished)  # what finished, for reports
                self._observe_checks(finished)
                pending = [repr(name) for name in self.checks if name not in finished]
                waiting_for = f" waiting for check {', '.join(pending)}" if pending else ""
                message = f"startup failed: timed out after {self.startup_timeout:g}s{waiting_for}"
                self.logger.error("%s", message)
                raise StartupError(message) from None
            self.logger.error("%s", exc)
            raise
        for result in results.values():
            if not result.ok:
                self.logger.warning(
                    "Non-critical check %r failed: %s; starting degraded", result.name, result.error
                )
        self.logger.info(
            "Startup complete in %.0fms: %d resources, %d checks",
            (perf_counter() - began) * 1000,
            len(self._resources.opened_names),
            len(results),
        )

    def _observe_checks(self, results: dict[str, CheckResult]) -> None:
        histogram = self.metrics.feature(LifespanCollectors).startup_checks
        for result in results.values():
            self.metrics.child(histogram, result.name, result.outcome).observe(result.duration)

    def finish_startup(self) -> None:
        """Started, the wrapped app's own startup included: ready, SIGTERM and process faults
        watched, background tasks started."""
        if self.state != "starting":
            raise RuntimeError(f"cannot finish the startup of a lifespan that is {self.state}")
        self.state = "ready"
        self.started_at = monotonic()
        self._sigterm.install()
        self._faults.install()
        self._tasks.start()

    async def run_checks(
        self, *, startup: bool = False, into: dict[str, CheckResult] | None = None
    ) -> dict[str, CheckResult]:
        """Run the checks concurrently, each under its own timeout, and return their results.

        Args:
            startup: run every check with its ``attempts``; otherwise only the readiness
                checks, once each (what ``/health/ready`` does).
            into: a dict to fill as checks finish (to know which were still running if the
                caller's deadline cut them short).
        """
        checks = [c for c in self.checks.values() if startup or c.readiness]
        return await self._runner.run(checks, startup=startup, into={} if into is None else into)

    @property
    def blocked_checks(self) -> dict[str, int]:
        """Sync checks whose thread timed out and has not returned yet, and how many each
        (such a check's readiness probe fails at once rather than block another thread)."""
        return {name: n for name in self.checks if (n := self._runner.blocked(name))}

    # -- draining --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Started, and neither draining nor stopping."""
        return self.state == "ready"

    def begin_drain(self) -> None:
        """Answer readiness probes with 503 from now on; what SIGTERM does first."""
        if self.state in ("idle", "starting", "ready"):
            self.state = "draining"
            self.logger.info("Draining: readiness now fails")

    def drain_now(self) -> None:
        """Begin draining now (readiness 503), and once ``drain_delay`` has passed tell
        long-lived connections to close (``going_away``); the server's own shutdown is left to
        its own signal. Safe from a signal handler or any thread: what a server's parent
        process asks of its workers before it stops them (``run --server granian``)."""
        self.begin_drain()
        self.go_away_in(self.drain_delay)

    def go_away_in(self, seconds: float) -> None:
        """``go_away()`` in ``seconds``, in the event loop's thread; callable from any thread
        or a signal handler (a timer's thread asks the loop, waking it if idle)."""
        token = self._loop_token
        if token is None:
            return  # never started: nothing is open

        def in_the_loop() -> None:
            try:
                anyio.from_thread.run_sync(self.go_away, token=token)
            except RuntimeError:
                pass  # the event loop is gone: nothing is open any more

        timer = threading.Timer(seconds, in_the_loop)
        timer.daemon = True
        timer.start()

    def go_away(self) -> None:
        """Tell long-lived connections to close (``going_away``): the drain delay is over.
        Called in the event loop's thread."""
        if self.going_away is not None and not self.going_away.is_set():
            self.going_away.set()

    @property
    def watching_sigterm(self) -> bool:
        """Our SIGTERM handler is installed (started in the main thread, not stopping)."""
        return self._sigterm.installed

    # -- shutdown --------------------------------------------------------------------------

    async def shutdown(self) -> list[ResourceReport]:
        """Wait for in-flight requests, close resources; idempotent. Returns the report."""
        if await self.begin_shutdown():
            await self.finish_shutdown()
        return self.shutdown_report

    async def begin_shutdown(self) -> bool:
        """Begin the shutdown (state ``stopping``, the server's SIGTERM handler back), wait up
        to ``drain_timeout`` for the requests in flight, then stop the background tasks (the
        first part of ``shutdown_timeout``). ``False``: not running, nothing to shut down."""
        if self.state not in ("ready", "draining"):
            return False
        self.state = "stopping"
        self._sigterm.restore()
        self.go_away()
        if self.in_flight:
            self.drained = anyio.Event()  # set by LifespanMiddleware when the last one ends
            with anyio.move_on_after(self.drain_timeout) as waiting:
                await self.drained.wait()
            self.drained = None
            if waiting.cancelled_caught:
                self.logger.warning(
                    "%d requests still in flight after %gs", self.in_flight, self.drain_timeout
                )
        self._shutdown_deadline = monotonic() + self.shutdown_timeout
        await self._stop_tasks()
        return True

    async def finish_shutdown(self) -> None:
        """Close the resources in reverse order within what is left of ``shutdown_timeout``
        (state ``stopped``); the report is kept. Process faults are no longer watched."""
        left = max(0.0, self._shutdown_deadline - monotonic())
        self.shutdown_report = await self._close_resources(left, grace=_LAST_SECOND)
        self.state = "stopped"
        self._faults.restore()
        if self._still_running() and self._sigterm.received:
            # The server's own teardown takes milliseconds; then, within the last second
            # the shutdown has, leave (an abandoned task would keep the process forever).
            end = self._shutdown_deadline + _LAST_SECOND - monotonic()
            exit_soon(min(0.5, max(0.0, end)), self.logger, self._still_running)

    def _still_running(self) -> list[str]:
        """What a shutdown abandoned and still runs: tasks, then closes."""
        return self._tasks.still_running + self._resources.still_running

    async def abort_startup(self) -> None:
        """The wrapped app's own startup failed after ours: close what was opened (state
        ``failed``)."""
        if self.state != "starting":
            raise RuntimeError(f"cannot abort the startup of a lifespan that is {self.state}")
        await self._close_resources(self.shutdown_timeout)
        self.state = "failed"

    async def _stop_tasks(self) -> None:
        if not self._tasks.registered:
            return
        self.task_report = reports = await self._tasks.stop(self.shutdown_timeout)
        abandoned = [r for r in reports if r.outcome == "abandoned"]
        self.logger.log(
            logging.WARNING if abandoned else logging.INFO,
            "Tasks stopped: %s%s",
            ", ".join(f"{r.name} {r.outcome} {r.duration * 1000:.0f}ms" for r in reports),
            _abandoned_suffix([r.name for r in abandoned]),
            extra={"tasks": [r.__dict__ for r in reports]},
        )

    async def _close_resources(self, seconds: float, *, grace: float = 0.0) -> list[ResourceReport]:
        reports = await self._resources.close(seconds, grace=grace)
        histogram = self.metrics.feature(LifespanCollectors).shutdown_resources
        for report in reports:
            self.metrics.child(histogram, report.name, report.outcome).observe(report.duration)
        if reports:
            failed = [r for r in reports if r.outcome != "ok"]
            self.logger.log(
                logging.WARNING if failed else logging.INFO,
                "Shutdown: %s%s",
                ", ".join(f"{r.name} {r.outcome} {r.duration * 1000:.0f}ms" for r in reports),
                _abandoned_suffix([r.name for r in reports if r.abandoned]),
                extra={"resources": [r.__dict__ for r in reports]},
            )
        return reports

    # -- reporting -------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """What ``/health/status`` shows: state, uptime (since ready), checks, resources,
        tasks, the process (pid, memory, uptime since it started, Python) and the sections
        added with ``add_status`` (a failing provider shows its error, never breaks the page)."""
        uptime = monotonic() - self.started_at if self.started_at is not None else None
        sections: dict[str, Any] = {}
        for name, provider in self._status_providers.items():
            try:
                section = provider()  # snapshots are cheap: no thread for them
                if inspect.isawaitable(section):
                    section = await section
                sections[name] = section
            except Exception as exc:
                sections[name] = {"error": describe_error(exc)}
        return {
            "state": self.state,
            "uptime_seconds": round(uptime, 3) if uptime is not None else None,
            "in_flight": self.in_flight,
            "checks": {
                name: {
                    "status": r.status,
                    "duration_ms": round(r.duration * 1000, 3),
                    "error": r.error,
                }
                for name, r in self.startup_results.items()
            },
            "resources": self._resources.opened_names,
            "tasks": {
                name: {
                    **self._tasks.states[name].as_dict(),
                    "critical": task.critical,
                    "every": task.every,
                }
                for name, task in self._tasks.registered.items()
            },
            "process": process_facts(),
            **sections,
        }

    # -- ASGI ------------------------------------------------------------------------------

    def __call__(self, app: object) -> AbstractAsyncContextManager[dict[str, Any]]:
        """The Starlette/FastAPI lifespan protocol: ``Starlette(lifespan=lifespan)``."""
        return self._context()

    @asynccontextmanager
    async def _context(self) -> AsyncIterator[dict[str, Any]]:
        owner = self.state in STARTABLE  # a wrap() around the app may have started it
        await self.startup()
        try:
            yield dict(self.values)
        finally:
            if owner:
                await self.shutdown()

    def serve(
        self, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options: Any
    ) -> None:
        """Serve this lifespan on its own, as a worker process without an HTTP app: health
        endpoints and ``/metrics`` on ``host:port``, checks, resources and tasks, until SIGTERM
        (see ``asgi_resilience.worker.serve``; ``options`` go to ``resilient()``).

        Raises:
            StartupError: startup failed; nothing was served.
        """
        # Imported here: the worker is built on the whole stack, which is built on Lifespan.
        from ..worker import serve

        serve(self, host=host, port=port, log_level=log_level, **options)

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """A layer around ``app`` that runs this lifespan (and ``app``'s own) and counts
        in-flight HTTP requests for draining."""
        # Imported here: the layer is built on Lifespan, which reaches it only when asked.
        from ._layer import LifespanMiddleware

        return LifespanMiddleware(app, lifespan=self)


def _abandoned_suffix(names: list[str]) -> str:
    if not names:
        return ""
    return f"; abandoned (still running): {', '.join(names)}"
