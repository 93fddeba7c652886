"""Process faults while a lifespan runs, bounded shutdowns, and the process facts of the status."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import os
import platform
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from time import perf_counter
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from asgi_resilience import HealthApp, Lifespan, resilient
from asgi_resilience.types import Receive, Scope, Send
from tests.asgi import call, http_scope

LIFESPAN_LOGGER = "asgi_resilience.lifespan"
pytestmark = pytest.mark.anyio


def unhandled(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.msg.startswith("Unhandled exception")]


def counted(registry: CollectorRegistry, source: str) -> float:
    value = registry.get_sample_value(
        "asgi_resilience_unhandled_exceptions_total", {"source": source}
    )
    return value or 0.0


def orphan_task_fails(name: str, exception: Exception) -> None:
    """Start a task whose exception nobody retrieves, then let it be collected."""

    async def lost() -> None:
        raise exception

    asyncio.get_running_loop().create_task(lost(), name=name)


async def until(condition: Callable[[], bool], seconds: float = 2) -> None:
    """Wait for what a thread or a signal does (no event to wait on), at most ``seconds``."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - set from a thread or a signal handler
            await anyio.sleep(0.01)


async def collect() -> None:
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()  # the loop reports an unretrieved exception when the task is collected


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # unretrieved task exceptions are asyncio's; trio's nurseries re-raise


async def test_an_exception_left_in_a_task_is_logged_once_counted_and_hooks_restored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    others: list[dict[str, Any]] = []

    def previous_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        others.append(context)

    loop.set_exception_handler(previous_handler)
    factory = loop.get_task_factory()
    registry = CollectorRegistry()
    lifespan = Lifespan(registry=registry)
    await lifespan.startup()
    try:
        orphan_task_fails("orphan", KeyError("lost"))
        await collect()
        [record] = unhandled(caplog)
        assert record.levelno == logging.ERROR
        assert record.getMessage() == "Unhandled exception in task 'orphan': KeyError: 'lost'"
        assert record.exc_info is not None and record.exc_info[0] is KeyError
        assert record.source == "task"  # type: ignore[attr-defined]
        assert record.request_id is None  # type: ignore[attr-defined]
        assert counted(registry, "task") == 1
        # Other loop errors still go to the handler that was there.
        loop.call_exception_handler({"message": "a socket error"})
        assert others == [{"message": "a socket error"}]
    finally:
        await lifespan.shutdown()
    assert loop.get_exception_handler() is previous_handler
    assert loop.get_task_factory() is factory
    loop.set_exception_handler(None)


async def test_a_task_exception_raised_inside_a_request_carries_its_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        orphan_task_fails("audit", RuntimeError("audit store down"))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    registry = CollectorRegistry()
    lifespan = Lifespan(registry=registry)
    stack = resilient(app, lifespan=lifespan, registry=registry, access_log=False)
    await lifespan.startup()
    try:
        response = await call(stack, http_scope(headers=[(b"x-request-id", b"req-42")]))
        assert response.status == 204
        await collect()
        [record] = unhandled(caplog)
        assert record.request_id == "req-42"  # type: ignore[attr-defined]
        assert counted(registry, "task") == 1
    finally:
        await lifespan.shutdown()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_an_exception_ending_a_thread_is_logged_once_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    lifespan = Lifespan(registry=registry)
    before = threading.excepthook
    await lifespan.startup()
    try:
        thread = threading.Thread(target=lambda: 1 / 0, name="exporter")
        thread.start()
        thread.join()
        [record] = unhandled(caplog)
        assert record.getMessage() == (
            "Unhandled exception in thread 'exporter': ZeroDivisionError: division by zero"
        )
        assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
        assert counted(registry, "thread") == 1

        assert record.request_id is None  # type: ignore[attr-defined]
        # A second thread: a second record, each exception once.
        thread = threading.Thread(target=lambda: int("twelve"), name="exporter-2")
        thread.start()
        thread.join()
        assert [r.origin for r in unhandled(caplog)] == ["exporter", "exporter-2"]  # type: ignore[attr-defined]
        assert counted(registry, "thread") == 2
    finally:
        await lifespan.shutdown()
    assert threading.excepthook is before


async def test_nothing_is_hooked_before_startup_or_after_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan = Lifespan(registry=CollectorRegistry())
    hook = threading.excepthook
    await lifespan.startup()
    assert threading.excepthook is not hook
    await lifespan.shutdown()
    assert threading.excepthook is hook
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: seen.append(context))
    try:
        orphan_task_fails("after", ValueError("not ours any more"))
        await collect()
    finally:
        loop.set_exception_handler(None)
    assert unhandled(caplog) == []
    assert [type(c["exception"]) for c in seen] == [ValueError]


@pytest.fixture
def server_handler() -> Iterator[list[int]]:
    """Plays the server's SIGTERM handler (uvicorn's would start its shutdown)."""
    calls: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        yield calls
    finally:
        signal.signal(signal.SIGTERM, original)


async def test_on_unhandled_shutdown_begins_a_graceful_shutdown(
    server_handler: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    lifespan = Lifespan(on_unhandled="shutdown", drain_delay=0.2, registry=CollectorRegistry())
    await lifespan.startup()
    try:
        for _ in range(2):  # a second fault does not signal again
            thread = threading.Thread(target=lambda: 1 / 0, name="poller")
            thread.start()
            thread.join()
        await until(lambda: lifespan.state == "draining")
        assert server_handler == []  # the drain delay first, as after SIGTERM
        await until(lambda: bool(server_handler))
        await anyio.sleep(0.05)  # a second fault's signal would have arrived by now
        assert server_handler == [signal.SIGTERM]
        assert unhandled(caplog)[0].getMessage().endswith("shutting down (on_unhandled='shutdown')")
    finally:
        await lifespan.shutdown()


def test_on_unhandled_takes_log_or_shutdown() -> None:
    with pytest.raises(ValueError, match="on_unhandled must be 'log' or 'shutdown'"):
        Lifespan(on_unhandled="exit")  # type: ignore[arg-type]


# -- bounded shutdown ------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_close_that_shields_itself_and_hangs_is_abandoned_and_the_rest_still_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = anyio.Event()
    closed: list[str] = []
    lifespan = Lifespan(shutdown_timeout=2)
    lifespan.add_resource("first", lambda: closed.append("first"))

    async def hang() -> None:
        with anyio.CancelScope(shield=True):
            await release.wait()
        closed.append("stuck")

    lifespan.add_resource("stuck", hang, timeout=0.2)
    lifespan.add_resource("last", lambda: closed.append("last"))
    await lifespan.startup()
    began = perf_counter()
    report = await lifespan.shutdown()
    elapsed = perf_counter() - began
    assert closed == ["last", "first"]
    assert [(r.name, r.outcome, r.abandoned) for r in report] == [
        ("last", "ok", False),
        ("stuck", "timeout", True),
        ("first", "ok", False),
    ]
    assert report[1].error == "abandoned after 0.2s, still running (it ignored its cancellation)"
    assert 0.2 <= elapsed < 0.6
    [logged] = [r for r in caplog.records if r.msg.startswith("Shutdown")]
    assert logged.getMessage().endswith("; abandoned (still running): stuck")
    release.set()
    await until(lambda: "stuck" in closed)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_tasks_and_resources_share_the_shutdown_timeout() -> None:
    release = anyio.Event()
    lifespan = Lifespan(shutdown_timeout=0.5)

    @lifespan.task("stubborn", timeout=0.3)
    async def stubborn() -> None:
        with anyio.CancelScope(shield=True):
            await release.wait()

    async def slow_close() -> None:
        await anyio.sleep(5)

    lifespan.add_resource("pool", slow_close, timeout=5)
    await lifespan.startup()
    began = perf_counter()
    await lifespan.shutdown()
    elapsed = perf_counter() - began
    assert lifespan.task_report[0].outcome == "abandoned"
    [pool] = lifespan.shutdown_report
    assert pool.outcome == "timeout" and not pool.abandoned
    assert 0.15 <= pool.duration <= 0.3  # what the task left of the 0.5 s
    assert 0.45 <= elapsed < 0.8
    release.set()


# -- process facts ---------------------------------------------------------------------------


def memory_of_this_process() -> tuple[int, int]:
    """Resident and peak resident bytes, as the kernel reports them in /proc/self/status."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return tuple(int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def seconds_since_this_process_started() -> int:
    elapsed = subprocess.run(
        ["ps", "-o", "etimes=", "-p", str(os.getpid())], capture_output=True, text=True, check=True
    )
    return int(elapsed.stdout)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_status_shows_the_process() -> None:
    lifespan = Lifespan()
    health = HealthApp(lifespan, status_details=True)
    await lifespan.startup()
    try:
        body = (await call(health, http_scope("/health/status"))).json()
    finally:
        await lifespan.shutdown()
    process = body["process"]
    assert process["pid"] == os.getpid()
    assert process["python"] == platform.python_version()
    vm_rss, vm_hwm = memory_of_this_process()
    assert abs(process["rss_bytes"] - vm_rss) < vm_rss * 0.2
    assert process["max_rss_bytes"] >= process["rss_bytes"]
    assert abs(process["max_rss_bytes"] - vm_hwm) < vm_hwm * 0.2
    assert abs(process["uptime_seconds"] - seconds_since_this_process_started()) <= 2
    assert body["tasks"] == {}


# -- the review's cases ----------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_cancelled_shutdown_still_stops_the_tasks_and_closes_the_resources() -> None:
    closed: list[str] = []
    lifespan = Lifespan()
    lifespan.add_resource("db", lambda: closed.append("db"))

    @lifespan.task("consumer")
    async def consumer() -> None:
        await anyio.sleep_forever()

    await lifespan.startup()
    with anyio.CancelScope() as scope:
        scope.cancel()  # the server gave up on the lifespan task
        await lifespan.shutdown()
    assert lifespan.state == "stopped"
    assert closed == ["db"]
    assert [(r.name, r.outcome) for r in lifespan.task_report] == [("consumer", "stopped")]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_group_raised_while_cancelled_is_neither_a_crash_nor_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan = Lifespan()

    @lifespan.task("fanout")
    async def fanout() -> None:
        async def failing_on_cancel() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                raise ConnectionError("broker gone while closing")

        async with anyio.create_task_group() as group:
            group.start_soon(failing_on_cancel)

    lifespan.add_resource("db", lambda: None)
    await lifespan.startup()
    await anyio.sleep(0.01)
    await lifespan.shutdown()  # on trio a system task raising would end the whole run
    assert [r.name for r in lifespan.shutdown_report] == ["db"]
    assert not [r for r in caplog.records if "crashed" in r.msg]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_generator_resource_lives_in_one_task_from_setup_to_teardown() -> None:
    variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable", default="unset")
    seen: list[str] = []
    lifespan = Lifespan()

    @lifespan.resource("poller")
    async def poller() -> AsyncIterator[str]:
        token = variable.set("inside")
        async with anyio.create_task_group() as group:  # held open across the yield
            group.start_soon(anyio.sleep_forever)
            yield "poller"
            seen.append(variable.get())
            group.cancel_scope.cancel()
        variable.reset(token)  # the same context: the token is valid

    await lifespan.startup()
    report = await lifespan.shutdown()
    assert [(r.name, r.outcome, r.error) for r in report] == [("poller", "ok", None)]
    assert seen == ["inside"]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_close_that_needs_a_moment_after_its_cancellation_is_not_abandoned() -> None:
    lifespan = Lifespan(shutdown_timeout=2)

    async def slow_then_polite() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.02)  # a last QUIT to the server

    lifespan.add_resource("cache", slow_then_polite, timeout=0.1)
    await lifespan.startup()
    [report] = await lifespan.shutdown()
    assert (report.outcome, report.abandoned) == ("timeout", False)
    assert report.error == "cancelled after 0.1s"


def test_the_forced_exit_does_not_fire_when_the_abandoned_work_ended() -> None:
    from asgi_resilience.lifespan._exit import exit_soon

    logger = logging.getLogger("tests.exit")
    timer = exit_soon(0.01, logger, list)  # nothing still running
    timer.join(2)
    assert not timer.is_alive()  # it returned: this process is still here


def test_on_unhandled_shutdown_off_the_main_thread_drains_instead_of_killing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    lifespan = Lifespan(on_unhandled="shutdown", registry=CollectorRegistry())
    app = resilient(Starlette(), lifespan=lifespan, registry=CollectorRegistry())
    with TestClient(app) as client:  # the app's loop runs in another thread
        thread = threading.Thread(target=lambda: 1 / 0, name="poller")
        thread.start()
        thread.join()
        assert lifespan.state == "draining"
        assert client.get("/health/ready").status_code == 503
    assert any("no SIGTERM handler of ours here" in r.getMessage() for r in caplog.records)


async def test_hooks_restored_out_of_order_pass_on_what_they_see(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = Lifespan(registry=CollectorRegistry()), Lifespan(registry=CollectorRegistry())
    original = threading.excepthook
    seen: list[str] = []
    threading.excepthook = lambda args: seen.append(str(args.exc_value))
    try:
        await first.startup()
        await second.startup()
        await first.shutdown()  # not the last installed: its hook stays under the second's
        await second.shutdown()  # gives back the first's hook, which passes faults on
        thread = threading.Thread(target=lambda: 1 / 0)
        thread.start()
        thread.join()
    finally:
        threading.excepthook = original
    assert seen == ["division by zero"]
    assert unhandled(caplog) == []


def test_tasks_are_added_before_the_lifespan_starts() -> None:
    async def main() -> None:
        lifespan = Lifespan()
        await lifespan.startup()
        try:
            with pytest.raises(RuntimeError, match="add task 'late' before the lifespan starts"):
                lifespan.add_task("late", _sleeping)
        finally:
            await lifespan.shutdown()

    anyio.run(main)


async def _sleeping() -> None:
    await anyio.sleep_forever()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_trial_startup_opens_checks_and_closes_but_starts_no_task() -> None:
    events: list[str] = []
    lifespan = Lifespan()
    lifespan.add_resource("db", lambda: events.append("closed"))

    @lifespan.check("db")
    async def db() -> None:
        events.append("checked")

    @lifespan.task("consumer")
    async def consumer() -> None:
        events.append("task ran")

    await lifespan.trial_startup()
    await anyio.sleep(0.05)
    assert events == ["checked", "closed"]
    assert lifespan.state == "stopped"
    assert not lifespan.watching_sigterm
