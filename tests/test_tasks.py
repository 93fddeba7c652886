"""Background tasks: periodic and long-running, supervised, stopped before resources close.

Time-driven behaviour runs on trio's ``MockClock`` (``autojump_threshold=0``: whenever every task
waits, the clock jumps to the next deadline), so "every 0.1 s for 2 s" takes no real time and
the times asserted are exact. A few tests run on both backends in real time, briefly.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry
from trio.testing import MockClock

from asgi_resilience import HealthApp, Lifespan, StartupError
from tests.asgi import call, http_scope, wait_until

LIFESPAN_LOGGER = "asgi_resilience.lifespan"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Both backends, as everywhere; ``@virtual`` tests: trio on a clock that jumps to the
    next deadline whenever every task waits."""
    if request.param == "fake":
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return request.param


virtual = pytest.mark.parametrize("anyio_backend", ["fake"], indirect=True, ids=["fake-clock"])


def registry_lifespan(**options: Any) -> tuple[Lifespan, CollectorRegistry]:
    registry = CollectorRegistry()
    return Lifespan(registry=registry, **options), registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# -- periodic tasks --------------------------------------------------------------------------


@virtual
@pytest.mark.anyio
async def test_a_periodic_task_runs_every_interval_from_startup_to_shutdown() -> None:
    lifespan, registry = registry_lifespan()
    starts: list[float] = []

    @lifespan.task("sweeper", every=0.1)
    async def sweeper() -> None:
        starts.append(anyio.current_time())

    began = anyio.current_time()
    await lifespan.startup()
    await anyio.sleep(1.05)
    await lifespan.shutdown()
    offsets = [round(t - began, 6) for t in starts]
    assert offsets == [round(0.1 * i, 6) for i in range(11)]  # 0.0, 0.1, ... 1.0
    await anyio.sleep(1)
    assert len(starts) == 11  # stopped at shutdown
    assert lifespan.task_report[0].name == "sweeper"
    assert lifespan.task_report[0].outcome == "stopped"
    assert sample(registry, "asgi_resilience_task_up", task="sweeper") == 0


@virtual
@pytest.mark.anyio
async def test_a_slow_run_is_never_overlapped_and_missed_runs_are_skipped() -> None:
    lifespan = Lifespan()
    running = 0
    most = 0
    starts: list[float] = []

    @lifespan.task("slow", every=0.1)
    async def slow() -> None:
        nonlocal running, most
        starts.append(anyio.current_time())
        running += 1
        most = max(most, running)
        await anyio.sleep(0.25)
        running -= 1

    began = anyio.current_time()
    await lifespan.startup()
    await anyio.sleep(1.1)
    await lifespan.shutdown()
    assert most == 1
    # Each run starts when the previous ends (0.25 s apart), not in a burst of missed ones.
    assert [round(t - began, 6) for t in starts] == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.anyio
async def test_a_periodic_task_runs_on_a_real_clock_too() -> None:
    lifespan = Lifespan()
    runs = 0

    @lifespan.task("tick", every=0.005)
    async def tick() -> None:
        nonlocal runs
        runs += 1

    await lifespan.startup()
    await anyio.sleep(0.05)
    await lifespan.shutdown()
    assert 4 <= runs <= 12


# -- long-running tasks ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_long_running_task_starts_after_the_checks_and_ends_before_resources_close() -> (
    None
):
    events: list[str] = []
    lifespan = Lifespan()

    @lifespan.resource("queue")
    async def queue() -> AsyncIterator[list[str]]:
        events.append("queue opened")
        yield events
        events.append("queue closed")

    @lifespan.check("broker")
    async def broker() -> None:
        await anyio.sleep(0.01)
        events.append("check passed")

    @lifespan.task("consumer")
    async def consumer() -> None:
        events.append("consumer started")
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)  # flushing: the queue is still open meanwhile
            events.append(f"consumer flushed, queue open: {'queue closed' not in events}")

    await lifespan.startup()
    await wait_until(lambda: "consumer started" in events)
    assert lifespan.state == "ready"
    status = await lifespan.status()
    assert status["tasks"]["consumer"]["running"] is True
    await lifespan.shutdown()
    assert events == [
        "queue opened",
        "check passed",
        "consumer started",
        "consumer flushed, queue open: True",
        "queue closed",
    ]
    assert [(r.name, r.outcome) for r in lifespan.task_report] == [("consumer", "stopped")]


@pytest.mark.anyio
async def test_tasks_do_not_start_when_startup_fails() -> None:
    lifespan = Lifespan()
    started: list[str] = []
    lifespan.add_check("database", lambda: False)

    @lifespan.task("sweeper", every=0.01)
    async def sweeper() -> None:
        started.append("sweeper")

    @lifespan.task("consumer")
    async def consumer() -> None:
        started.append("consumer")

    registry = CollectorRegistry()
    lifespan.registry = registry
    with pytest.raises(StartupError):
        await lifespan.startup()
    await anyio.sleep(0.05)
    assert started == []
    assert sample(registry, "asgi_resilience_task_up", task="sweeper") is None  # never up


@pytest.mark.anyio
async def test_a_task_that_returns_is_finished_not_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LIFESPAN_LOGGER)
    lifespan = Lifespan()
    runs = 0

    @lifespan.task("migrate")
    async def migrate() -> None:
        nonlocal runs
        runs += 1

    await lifespan.startup()
    with anyio.fail_after(2):
        while (await lifespan.status())["tasks"]["migrate"]["running"]:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    await anyio.sleep(0.05)
    assert runs == 1
    status = (await lifespan.status())["tasks"]["migrate"]
    assert status["running"] is False and status["restarts"] == 0
    assert any(r.getMessage() == "Task 'migrate' finished" for r in caplog.records)
    await lifespan.shutdown()


# -- crashes ---------------------------------------------------------------------------------


@virtual
@pytest.mark.anyio
async def test_a_crashing_task_is_logged_counted_and_restarted_with_capped_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan, registry = registry_lifespan()
    starts: list[float] = []

    @lifespan.task("flaky")
    async def flaky() -> None:
        starts.append(anyio.current_time())
        raise ConnectionError(f"broker gone #{len(starts)}")

    began = anyio.current_time()
    await lifespan.startup()
    await anyio.sleep(200)
    status = (await lifespan.status())["tasks"]["flaky"]
    await lifespan.shutdown()

    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    # The first restart within 1 s, doubling, capped at 60 s.
    assert gaps[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    assert starts[0] == began
    assert set(gaps[7:]) == {60.0}
    crashes = [r for r in caplog.records if r.name == LIFESPAN_LOGGER and "crashed" in r.msg]
    assert len(crashes) == len(starts)  # once per crash
    assert all(r.levelno == logging.ERROR and r.exc_info for r in crashes)
    assert crashes[0].getMessage() == (
        "Task 'flaky' crashed: ConnectionError: broker gone #1; restarting in 0.5s"
    )
    assert crashes[0].task == "flaky"  # type: ignore[attr-defined]
    restarts = len(starts) - 1
    assert sample(registry, "asgi_resilience_task_restarts_total", task="flaky") == restarts
    assert status["restarts"] == restarts
    assert status["last_error"] == f"ConnectionError: broker gone #{len(starts)}"
    assert status["last_run"].endswith("Z")


@virtual
@pytest.mark.anyio
async def test_a_task_crashing_for_days_is_still_restarted_every_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.CRITICAL, LIFESPAN_LOGGER)  # 1,100 tracebacks: not kept
    lifespan = Lifespan()
    runs = 0

    @lifespan.task("flaky")
    async def flaky() -> None:
        nonlocal runs
        runs += 1
        raise ConnectionError("broker down for the weekend")

    await lifespan.startup()
    await anyio.sleep(1100 * 60)  # past 1,024 crashes: 2 ** 1024 would not fit a float
    before = runs
    await anyio.sleep(3600)
    status = (await lifespan.status())["tasks"]["flaky"]
    await lifespan.shutdown()
    assert before > 1050
    assert runs - before in (59, 60, 61)  # still once a minute
    assert status["restarts"] == runs - 1


@virtual
@pytest.mark.anyio
async def test_a_crash_in_a_periodic_task_backs_off_then_the_rate_resumes() -> None:
    lifespan = Lifespan()
    starts: list[float] = []

    @lifespan.task("sweeper", every=0.1)
    async def sweeper() -> None:
        starts.append(anyio.current_time())
        if len(starts) in (3, 4):
            raise RuntimeError("disk full")

    began = anyio.current_time()
    await lifespan.startup()
    await anyio.sleep(2.0)
    await lifespan.shutdown()
    offsets = [round(t - began, 6) for t in starts]
    # runs at 0, 0.1, 0.2 (crash: 0.5 s), 0.7 (crash again: 1 s), 1.7, then every 0.1 s.
    assert offsets[:6] == [0.0, 0.1, 0.2, 0.7, 1.7, 1.8]


@virtual
@pytest.mark.anyio
async def test_with_restart_false_a_crashed_task_stays_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan, registry = registry_lifespan()
    runs = 0

    @lifespan.task("once", restart=False)
    async def once() -> None:
        nonlocal runs
        runs += 1
        raise ValueError("bad config")

    await lifespan.startup()
    await anyio.sleep(300)
    status = (await lifespan.status())["tasks"]["once"]
    await lifespan.shutdown()
    assert runs == 1
    assert status["running"] is False and status["restarts"] == 0
    assert status["last_error"] == "ValueError: bad config"
    assert sample(registry, "asgi_resilience_task_up", task="once") == 0
    assert sample(registry, "asgi_resilience_task_restarts_total", task="once") in (None, 0)
    [crash] = [r for r in caplog.records if "crashed" in r.msg]
    assert crash.getMessage().endswith("not restarted (restart=False)")


@virtual
@pytest.mark.anyio
async def test_a_critical_task_that_is_down_makes_readiness_fail_until_it_runs_again() -> None:
    lifespan, registry = registry_lifespan()
    health = HealthApp(lifespan, cache_ttl=0)
    healthy = anyio.Event()
    crashes = 0

    @lifespan.task("consumer", critical=True)
    async def consumer() -> None:
        nonlocal crashes
        if crashes == 0:
            crashes += 1
            await anyio.sleep(1)
            raise ConnectionError("broker gone")
        healthy.set()
        await anyio.sleep_forever()

    @lifespan.task("reporter", every=10)  # not critical: never in readiness
    async def reporter() -> None:
        raise RuntimeError("ignored by readiness")

    await lifespan.startup()
    assert (await call(health, http_scope("/health/ready"))).status == 200
    await anyio.sleep(1.2)  # crashed at 1.0, restarts at 1.5
    down = await call(health, http_scope("/health/ready"))
    assert down.status == 503
    assert down.json()["tasks_down"] == ["consumer"]
    assert sample(registry, "asgi_resilience_task_up", task="consumer") == 0
    await healthy.wait()
    assert (await call(health, http_scope("/health/ready"))).status == 200
    assert sample(registry, "asgi_resilience_task_up", task="consumer") == 1
    await lifespan.shutdown()


# -- shutdown --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_task_that_ignores_cancellation_is_abandoned_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan = Lifespan(shutdown_timeout=2)
    release = anyio.Event()
    closed: list[str] = []
    lifespan.add_resource("db", lambda: closed.append("db"))

    @lifespan.task("stubborn", timeout=0.1)
    async def stubborn() -> None:
        with anyio.CancelScope(shield=True):
            await release.wait()

    @lifespan.task("polite", timeout=0.5)
    async def polite() -> None:
        await anyio.sleep_forever()

    await lifespan.startup()
    await anyio.sleep(0.01)
    with anyio.fail_after(1.5):
        await lifespan.shutdown()
    outcomes = {r.name: r.outcome for r in lifespan.task_report}
    assert outcomes == {"stubborn": "abandoned", "polite": "stopped"}
    by_name = {r.name: r for r in lifespan.task_report}
    assert 0.1 <= by_name["stubborn"].duration < 0.5
    assert closed == ["db"]  # the shutdown went on
    [logged] = [r for r in caplog.records if r.msg.startswith("Tasks stopped")]
    assert logged.levelno == logging.WARNING
    assert "abandoned (still running): stubborn" in logged.getMessage()
    release.set()


# -- registration ----------------------------------------------------------------------------


async def _noop() -> None:
    pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": 0}, "task 'job': every must be"),
        ({"every": "1s"}, "task 'job': every must be"),
        ({"timeout": -1}, "task 'job': timeout must be"),
        ({"critical": "yes"}, "task 'job': critical must be True or False"),
        ({"restart": 1}, "task 'job': restart must be True or False"),
    ],
)
def test_wrong_task_options_are_value_errors_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Lifespan().add_task("job", _noop, **options)


def test_a_task_must_be_an_async_function_with_a_unique_name() -> None:
    lifespan = Lifespan()
    with pytest.raises(ValueError, match=r"must be an async function .*anyio.to_thread"):
        lifespan.add_task("sync", lambda: None)  # type: ignore[arg-type,return-value]
    lifespan.add_task("job", _noop)
    with pytest.raises(ValueError, match="a task named 'job' is already registered"):
        lifespan.add_task("job", _noop)
    with pytest.raises(ValueError, match="a task's name"):
        lifespan.add_task("", _noop)
    assert lifespan.task_names == ["job"]
