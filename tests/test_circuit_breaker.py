from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_resilience import CircuitOpenError, Lifespan, resilient
from asgi_resilience.circuit_breaker import CircuitBreaker, retry
from tests.asgi import client_for, wait_until
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio


class Throttled(Exception):
    """An error carrying the server's Retry-After, in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"throttled for {retry_after}s")
        self.retry_after = retry_after


async def ok() -> str:
    return "ok"


async def boom() -> str:
    raise ConnectionError("connection refused")


def make_breaker(
    clock: FakeClock | None = None, registry: CollectorRegistry | None = None, **options: Any
) -> CircuitBreaker:
    options.setdefault("failure_threshold", 1)
    options.setdefault("recovery_timeout", 30.0)
    return CircuitBreaker(
        "payments",
        clock=clock or FakeClock(),
        registry=registry if registry is not None else CollectorRegistry(),
        **options,
    )


async def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            await breaker.call(boom)


def calls(registry: CollectorRegistry, outcome: str, breaker: str = "payments") -> float:
    labels = {"breaker": breaker, "outcome": outcome}
    value = registry.get_sample_value("asgi_resilience_circuit_breaker_calls_total", labels)
    return value or 0.0


def states(registry: CollectorRegistry, breaker: str = "payments") -> dict[str, float | None]:
    return {
        state: registry.get_sample_value(
            "asgi_resilience_circuit_breaker_state", {"breaker": breaker, "state": state}
        )
        for state in ("closed", "open", "half_open")
    }


def state_of(breaker: CircuitBreaker) -> str:
    """``breaker.state``, read afresh (mypy would keep the narrowing of an earlier assert)."""
    return breaker.state


# -- closed -> open --------------------------------------------------------------------------


async def test_consecutive_failures_open_and_open_rejects_at_once_with_time_left() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=3)
    await fail(breaker, 2)
    assert await breaker.call(ok) == "ok"  # a success resets the count
    await fail(breaker, 2)
    assert state_of(breaker) == "closed"
    await fail(breaker)
    assert state_of(breaker) == "open"

    called = False

    async def dependency() -> None:
        nonlocal called
        called = True

    clock.advance(12.5)
    with pytest.raises(CircuitOpenError) as rejected:
        await breaker.call(dependency)
    assert not called
    assert rejected.value.breaker == "payments"
    assert rejected.value.retry_after == pytest.approx(17.5)
    assert breaker.snapshot()["retry_after"] == pytest.approx(17.5)


async def test_failure_rate_over_a_sliding_window() -> None:
    breaker = make_breaker(failure_rate_threshold=0.5, window_size=4, minimum_calls=4)
    await fail(breaker, 3)  # 100% but fewer than minimum_calls: failure_threshold=1 is unused
    assert state_of(breaker) == "closed"
    assert await breaker.call(ok) == "ok"  # F F F S: 75% over 4 calls, judged on a success too
    assert state_of(breaker) == "open"

    breaker = make_breaker(failure_rate_threshold=0.5, window_size=4, minimum_calls=4)
    for _ in range(2):
        assert await breaker.call(ok) == "ok"
    await fail(breaker)
    assert await breaker.call(ok) == "ok"  # S S F S: 25%
    assert breaker.snapshot()["failure_rate"] == 0.25
    await fail(breaker)  # S F S F in the window (2 of all 5 would be 40%)
    assert state_of(breaker) == "open"

    breaker = make_breaker(failure_rate_threshold=0.5, window_size=4, minimum_calls=4)
    await fail(breaker)
    for _ in range(4):
        assert await breaker.call(ok) == "ok"
    await fail(breaker)  # the first failure slid out: S S S F
    assert state_of(breaker) == "closed"
    assert breaker.snapshot()["failure_rate"] == 0.25


async def test_excluded_exceptions_neither_fail_nor_succeed() -> None:
    registry = CollectorRegistry()
    breaker = make_breaker(registry=registry, failure_threshold=2, exclude=KeyError)

    async def not_found() -> None:
        raise KeyError("no such order")

    await fail(breaker)
    for _ in range(5):
        with pytest.raises(KeyError):
            await breaker.call(not_found)
    assert state_of(breaker) == "closed"
    await fail(breaker)  # the count was not reset by the excluded calls either
    assert state_of(breaker) == "open"
    assert calls(registry, "excluded") == 5
    assert calls(registry, "failure") == 2


async def test_a_call_slower_than_timeout_counts_as_a_failure() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    breaker = make_breaker(clock, registry, timeout=1.0)

    async def slow() -> str:
        clock.advance(1.5)
        return "late"

    assert await breaker.call(slow) == "late"  # finished: the caller keeps its result
    assert state_of(breaker) == "open"
    assert calls(registry, "timeout") == 1
    assert calls(registry, "success") == 0


async def test_a_hung_call_is_cancelled_at_timeout() -> None:
    registry = CollectorRegistry()
    breaker = make_breaker(registry=registry, timeout=0.001)
    with pytest.raises(TimeoutError, match="payments"):
        await breaker.call(anyio.sleep_forever)
    assert state_of(breaker) == "open"
    assert calls(registry, "timeout") == 1


# -- half-open ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_calls", [1, 3])
async def test_half_open_lets_exactly_max_calls_of_500_concurrent_callers_through(
    max_calls: int,
) -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    breaker = make_breaker(clock, registry, half_open_max_calls=max_calls)
    await fail(breaker)
    clock.advance(30)
    release = anyio.Event()
    admitted = 0
    rejected: list[CircuitOpenError] = []

    async def trial() -> str:
        nonlocal admitted
        admitted += 1
        await release.wait()
        return "ok"

    async def caller() -> None:
        try:
            await breaker.call(trial)
        except CircuitOpenError as exc:
            rejected.append(exc)

    async with anyio.create_task_group() as group:
        for _ in range(500):
            group.start_soon(caller)
        await wait_until(lambda: admitted + len(rejected) == 500)
        assert state_of(breaker) == "half_open"
        assert breaker.snapshot()["half_open_calls"] == max_calls
        release.set()
    assert admitted == max_calls
    assert len(rejected) == 500 - max_calls
    assert {exc.retry_after for exc in rejected} == {0.0}
    assert state_of(breaker) == "closed"  # every trial succeeded
    assert calls(registry, "rejected") == 500 - max_calls


async def test_a_failed_trial_reopens_and_trials_of_a_past_period_count_for_nothing() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, half_open_max_calls=2)
    await fail(breaker)
    clock.advance(30)
    release = anyio.Event()

    async def late_trial() -> str:
        await release.wait()
        return "ok"

    async with anyio.create_task_group() as group:
        group.start_soon(breaker.call, late_trial)
        await wait_until(lambda: breaker.snapshot()["half_open_calls"] == 1)
        await fail(breaker)  # the second trial fails: open again for a full recovery_timeout
        with pytest.raises(CircuitOpenError) as rejected:
            await breaker.call(ok)
        assert rejected.value.retry_after == 30
        clock.advance(30)
        assert state_of(breaker) == "half_open"
        release.set()  # the first trial, of the past half-open period, succeeds only now
    assert breaker.snapshot()["half_open_calls"] == 0
    assert await breaker.call(ok) == "ok"
    assert state_of(breaker) == "half_open"  # one of this period's two trials passed
    assert await breaker.call(ok) == "ok"
    assert state_of(breaker) == "closed"


@pytest.mark.parametrize("late_outcome", ["success", "failure"])
async def test_a_call_admitted_while_closed_does_not_decide_the_half_open_state(
    late_outcome: str,
) -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    release = anyio.Event()

    async def slow() -> str:
        await release.wait()
        if late_outcome == "failure":
            raise ConnectionError("late")
        return "ok"

    async def call_slow() -> None:
        with contextlib.suppress(ConnectionError):
            await breaker.call(slow)

    async with anyio.create_task_group() as group:
        group.start_soon(call_slow)  # admitted while closed
        await wait_until(lambda: release.statistics().tasks_waiting == 1)
        await fail(breaker)
        clock.advance(30)
        assert state_of(breaker) == "half_open"
        release.set()
    assert state_of(breaker) == "half_open"  # a closed-era outcome is no trial
    assert breaker.snapshot()["half_open_calls"] == 0
    assert await breaker.call(ok) == "ok"  # the one permit is still there
    assert state_of(breaker) == "closed"


async def test_a_cancelled_trial_releases_its_permit() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    breaker = make_breaker(clock, registry)
    await fail(breaker)
    clock.advance(30)
    async with anyio.create_task_group() as group:
        group.start_soon(breaker.call, anyio.sleep_forever)
        await wait_until(lambda: breaker.snapshot()["half_open_calls"] == 1)
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)  # the trial holds the only permit
        group.cancel_scope.cancel()
    assert state_of(breaker) == "half_open"
    assert breaker.snapshot()["half_open_calls"] == 0
    assert calls(registry, "failure") == 1  # the cancellation is not counted
    assert await breaker.call(ok) == "ok"
    assert state_of(breaker) == "closed"


async def test_no_lock_is_held_across_the_call() -> None:
    breaker = CircuitBreaker("slow", registry=CollectorRegistry())
    release = anyio.Event()
    inside = 0
    results: list[str] = []

    async def dependency() -> str:
        nonlocal inside
        inside += 1
        await release.wait()
        return "done"

    async def call_dependency() -> None:
        results.append(await breaker.call(dependency))

    async with anyio.create_task_group() as group:
        for _ in range(100):
            group.start_soon(call_dependency)
        await wait_until(lambda: inside == 100)  # a lock held across the call would admit one
        release.set()
    assert results == ["done"] * 100


# -- forms, metrics, logs, status, options ------------------------------------------------


async def test_decorator_async_with_and_call_forms() -> None:
    registry = CollectorRegistry()
    breaker = make_breaker(registry=registry, failure_threshold=3)

    @breaker
    async def fetch(order_id: int, *, currency: str) -> str:
        return f"{order_id} {currency}"

    assert fetch.__name__ == "fetch"
    assert await fetch(7, currency="EUR") == "7 EUR"
    async with breaker:
        pass
    assert await breaker.call(fetch.__wrapped__, 8, currency="USD") == "8 USD"  # type: ignore[attr-defined]
    assert calls(registry, "success") == 3

    async def failing() -> None:
        raise ConnectionError

    with pytest.raises(ConnectionError):
        async with breaker:
            await failing()
    with pytest.raises(ConnectionError):
        await breaker(failing)()
    await fail(breaker)
    assert state_of(breaker) == "open"

    ran = False
    with pytest.raises(CircuitOpenError):
        async with breaker:
            ran = True
    assert not ran
    with pytest.raises(CircuitOpenError):
        await fetch(9, currency="GBP")
    assert calls(registry, "rejected") == 2


async def test_nested_breakers_in_one_task() -> None:
    outer = CircuitBreaker("outer", failure_threshold=1, registry=CollectorRegistry())
    inner = CircuitBreaker("inner", failure_threshold=1, registry=CollectorRegistry())
    with pytest.raises(ConnectionError):
        async with outer:
            async with inner:
                await boom()
    assert (state_of(outer), state_of(inner)) == ("open", "open")


async def test_exiting_a_breaker_never_entered_is_an_error() -> None:
    breaker = make_breaker()
    assert repr(breaker) == "CircuitBreaker('payments', state='closed')"
    with pytest.raises(RuntimeError, match="exited without being entered"):
        await breaker.__aexit__(None, None, None)


def test_decorating_a_sync_function_is_refused() -> None:
    def sync() -> str:
        return "ok"

    with pytest.raises(TypeError, match="async functions"):
        make_breaker()(sync)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async functions"):
        retry()(sync)  # type: ignore[arg-type]


async def test_state_gauge_and_call_counters_follow_every_transition() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    breaker = make_breaker(clock, registry, failure_threshold=2)
    assert states(registry) == {"closed": 1, "open": 0, "half_open": 0}
    assert await breaker.call(ok) == "ok"
    await fail(breaker, 2)
    assert states(registry) == {"closed": 0, "open": 1, "half_open": 0}
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    clock.advance(30)
    assert state_of(breaker) == "half_open"
    assert states(registry) == {"closed": 0, "open": 0, "half_open": 1}
    assert await breaker.call(ok) == "ok"
    assert states(registry) == {"closed": 1, "open": 0, "half_open": 0}
    counted = {o: calls(registry, o) for o in ("success", "failure", "rejected", "timeout")}
    assert counted == {"success": 2, "failure": 2, "rejected": 1, "timeout": 0}


async def test_transitions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=2)
    await fail(breaker, 2)
    clock.advance(30)
    assert await breaker.call(ok) == "ok"
    records = [r for r in caplog.records if r.name == "asgi_resilience.circuit_breaker"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "Circuit breaker 'payments' closed -> open: 2 consecutive failures"),
        (logging.INFO, "Circuit breaker 'payments' open -> half_open: 30s elapsed"),
        (logging.INFO, "Circuit breaker 'payments' half_open -> closed: 1 trial calls passed"),
    ]
    assert records[0].args == ("payments", "closed", "open", "2 consecutive failures")


async def test_install_adds_one_status_section_for_all_breakers() -> None:
    clock = FakeClock()
    lifespan = Lifespan(registry=CollectorRegistry())
    payments = make_breaker(clock)
    search = CircuitBreaker("search", clock=clock, registry=CollectorRegistry())
    payments.install(lifespan)
    payments.install(lifespan)  # idempotent
    search.install(lifespan)
    with pytest.raises(ValueError, match="already installed"):
        make_breaker(clock).install(lifespan)
    await fail(payments)
    clock.advance(10)
    status = await lifespan.status()
    assert status["circuit_breakers"] == {
        "payments": {
            "state": "open",
            "retry_after": 20.0,
            "consecutive_failures": 0,
            "failure_rate": None,
            "half_open_calls": 0,
        },
        "search": {
            "state": "closed",
            "retry_after": None,
            "consecutive_failures": 0,
            "failure_rate": None,
            "half_open_calls": 0,
        },
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold must be a whole number >= 1"),
        ({"half_open_max_calls": 1.5}, "half_open_max_calls must be a whole number"),
        ({"recovery_timeout": 0}, "recovery_timeout must be a positive"),
        ({"timeout": -1}, "timeout must be a positive"),
        ({"failure_rate_threshold": 50}, r"a fraction in \(0, 1\], e.g. 0.5 for 50%"),
        ({"window_size": 5, "minimum_calls": 10}, r"minimum_calls \(10\) must be <= window_size"),
        ({"exclude": [KeyboardInterrupt]}, "exclude must be Exception subclasses"),
    ],
)
def test_breaker_options_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker("payments", registry=CollectorRegistry(), **options)
    with pytest.raises(ValueError, match="non-empty string"):
        CircuitBreaker("", registry=CollectorRegistry())


# -- through resilient() -------------------------------------------------------------------


def payments_app(breaker: CircuitBreaker) -> Starlette:
    async def charge(request: Request) -> JSONResponse:
        if request.query_params.get("fail"):
            await breaker.call(boom)
        return JSONResponse({"result": await breaker.call(ok)})

    return Starlette(routes=[Route("/charge", charge)])


async def test_resilient_answers_an_open_breaker_with_503_and_retry_after() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    breaker = make_breaker(clock, registry)
    app = resilient(payments_app(breaker), registry=registry, debug=False)
    async with client_for(app) as client:
        assert (await client.get("/charge")).json() == {"result": "ok"}
        failed = await client.get("/charge?fail=1")
        clock.advance(10.4)
        rejected = await client.get("/charge")
    assert failed.status_code == 500
    assert rejected.status_code == 503
    assert rejected.headers["content-type"] == "application/problem+json"
    assert rejected.headers["retry-after"] == "20"  # ceil(19.6)
    body = rejected.json()
    assert body["status"] == 503
    assert body["code"] == "circuit_open"
    assert body["request_id"] == rejected.headers["x-request-id"]


async def test_resilient_metrics_show_breaker_states_and_calls() -> None:
    registry = CollectorRegistry()
    breaker = make_breaker(registry=registry)
    app = resilient(payments_app(breaker), registry=registry)
    async with client_for(app) as client:
        await client.get("/charge")
        await client.get("/charge?fail=1")
        await client.get("/charge")
        metrics = (await client.get("/metrics")).text
    for line in (
        'asgi_resilience_circuit_breaker_state{breaker="payments",state="closed"} 0.0',
        'asgi_resilience_circuit_breaker_state{breaker="payments",state="open"} 1.0',
        'asgi_resilience_circuit_breaker_state{breaker="payments",state="half_open"} 0.0',
        'asgi_resilience_circuit_breaker_calls_total{breaker="payments",outcome="success"} 1.0',
        'asgi_resilience_circuit_breaker_calls_total{breaker="payments",outcome="failure"} 1.0',
        'asgi_resilience_circuit_breaker_calls_total{breaker="payments",outcome="rejected"} 1.0',
    ):
        assert line in metrics.splitlines(), line


async def test_resilient_health_status_shows_breaker_states() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    lifespan = Lifespan(registry=registry)
    breaker = make_breaker(clock, registry)
    breaker.install(lifespan)
    app = resilient(
        payments_app(breaker), lifespan=lifespan, health_status_details=True, registry=registry
    )
    async with LifespanManager(app) as manager, client_for(manager.app) as client:
        before = (await client.get("/health/status")).json()
        await client.get("/charge?fail=1")
        clock.advance(5)
        after = (await client.get("/health/status")).json()
    assert before["circuit_breakers"]["payments"]["state"] == "closed"
    assert after["circuit_breakers"]["payments"]["state"] == "open"
    assert after["circuit_breakers"]["payments"]["retry_after"] == 25.0
