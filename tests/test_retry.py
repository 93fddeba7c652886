"""``retry``: backoff, caps, Retry-After, deadlines; with fake clocks and sleeps."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from asgi_resilience import CircuitOpenError
from asgi_resilience.retry import Retry, retry
from tests.fakes import FakeClock, FakeSleep, HighestRandom, LowestRandom
from tests.test_circuit_breaker import Throttled, fail, make_breaker, state_of

pytestmark = pytest.mark.anyio


def flaky(failures: list[Exception], result: str = "ok") -> Callable[[], Any]:
    """An async callable raising each of ``failures`` in turn, then returning ``result``."""
    attempts: list[int] = []

    async def call() -> str:
        attempts.append(1)
        if len(attempts) <= len(failures):
            raise failures[len(attempts) - 1]
        return result

    call.attempts = attempts  # type: ignore[attr-defined]
    return call


async def test_retry_waits_full_jitter_exponential_backoff_with_a_cap() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    policy = Retry(
        6, backoff=1.0, max_backoff=4.0, random=random.Random(7), sleep=sleep, clock=clock
    )
    fn = flaky([ConnectionError(str(n)) for n in range(5)])
    assert await policy.call(fn) == "ok"
    expected = random.Random(7)
    assert sleep.waits == [expected.uniform(0, cap) for cap in (1, 2, 4, 4, 4)]
    assert len(set(sleep.waits)) == 5


async def test_retry_reraises_the_last_error_after_its_attempts() -> None:
    sleep = FakeSleep(FakeClock())
    errors: list[Exception] = [ConnectionError(str(n)) for n in range(3)]
    fn = flaky(errors)
    with pytest.raises(ConnectionError) as raised:
        await Retry(3, sleep=sleep).call(fn)
    assert raised.value is errors[2]
    assert len(fn.attempts) == 3  # type: ignore[attr-defined]
    assert len(sleep.waits) == 2


async def test_retry_lets_unlisted_exceptions_through_at_once() -> None:
    sleep = FakeSleep(FakeClock())
    fn = flaky([ValueError("bad input")])
    with pytest.raises(ValueError, match="bad input"):
        await Retry(5, retry_on=(ConnectionError, TimeoutError), sleep=sleep).call(fn)
    assert len(fn.attempts) == 1  # type: ignore[attr-defined]
    assert sleep.waits == []


async def test_retry_honours_retry_after_as_the_least_wait() -> None:
    sleep = FakeSleep(FakeClock())
    fn = flaky([Throttled(3.0)])
    assert await Retry(backoff=0.1, sleep=sleep).call(fn) == "ok"
    assert sleep.waits == [3.0]

    fn = flaky([Throttled(60.0)])  # longer than max_backoff allows: no point waiting
    with pytest.raises(Throttled):
        await Retry(backoff=0.1, max_backoff=10, sleep=sleep).call(fn)
    assert len(fn.attempts) == 1  # type: ignore[attr-defined]
    assert sleep.waits == [3.0]


async def test_retry_starts_no_sleep_that_would_end_past_the_deadline() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    errors: list[Exception] = [ConnectionError(str(n)) for n in range(10)]

    async def slow_failure() -> None:
        clock.advance(1.0)
        raise errors[len(sleep.waits)]

    policy = Retry(10, backoff=1.0, deadline=2.5, random=HighestRandom(), sleep=sleep, clock=clock)
    with pytest.raises(ConnectionError) as raised:
        await policy.call(slow_failure)
    # t=1 fails, waits 1 (ends at 2 < 2.5); t=3 fails, a wait of 2 would end past the deadline.
    assert sleep.waits == [1.0]
    assert raised.value is errors[1]


async def test_retry_makes_no_attempt_after_a_sleep_that_overran_the_deadline() -> None:
    clock = FakeClock()
    waits: list[float] = []

    async def oversleep(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(seconds * 5)

    fn = flaky([ConnectionError("down")])
    policy = Retry(3, backoff=1.0, deadline=3, random=HighestRandom(), sleep=oversleep, clock=clock)
    with pytest.raises(ConnectionError, match="down"):
        await policy.call(fn)
    assert waits == [1.0]
    assert len(fn.attempts) == 1  # type: ignore[attr-defined]


async def test_retry_cancels_an_attempt_running_at_the_deadline() -> None:
    sleep = FakeSleep(FakeClock())
    with pytest.raises(TimeoutError):
        await Retry(5, deadline=0.001, sleep=sleep).call(anyio.sleep_forever)
    assert sleep.waits == []


async def test_retry_never_spins_on_a_circuit_open_error() -> None:
    sleep = FakeSleep(FakeClock())
    fn = flaky([CircuitOpenError("payments", 0.0)] * 3)  # half-open, permits taken
    assert await Retry(4, backoff=0.2, random=LowestRandom(), sleep=sleep).call(fn) == "ok"
    assert sleep.waits == [0.2, 0.2, 0.2]  # full jitter drew 0 each time

    for policy in (
        Retry(4, max_backoff=30, deadline=5, sleep=sleep),  # 20s do not fit in the deadline
        Retry(4, max_backoff=10, sleep=sleep),  # nor under max_backoff
    ):
        fn = flaky([CircuitOpenError("payments", 20.0)])
        with pytest.raises(CircuitOpenError):
            await policy.call(fn)
        assert len(fn.attempts) == 1  # type: ignore[attr-defined]
    assert sleep.waits == [0.2, 0.2, 0.2]


async def test_retry_waits_out_an_open_breaker_then_gets_through() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    breaker = make_breaker(clock, recovery_timeout=2.0)
    await fail(breaker)
    clock.advance(0.5)

    @retry(3, max_backoff=5, random=LowestRandom(), sleep=sleep, clock=clock)
    @breaker
    async def charge(amount: int) -> str:
        return f"charged {amount}"

    assert charge.__name__ == "charge"
    assert await charge(42) == "charged 42"
    assert sleep.waits == [1.5]  # exactly the breaker's time left
    assert state_of(breaker) == "closed"


async def test_each_retry_is_logged_on_the_retry_logger(caplog: pytest.LogCaptureFixture) -> None:
    sleep = FakeSleep(FakeClock())
    fn = flaky([ConnectionError("refused")])
    caplog.set_level(logging.INFO, logger="asgi_resilience.retry")
    assert await Retry(3, random=HighestRandom(), sleep=sleep).call(fn) == "ok"
    [record] = [r for r in caplog.records if r.name == "asgi_resilience.retry"]
    assert record.getMessage().startswith("Retrying ")
    assert "(attempt 1 of 3)" in record.getMessage()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attempts": 0}, "attempts must be a whole number >= 1"),
        ({"backoff": 0}, "backoff must be a positive"),
        ({"backoff": 2, "max_backoff": 1}, r"max_backoff \(1\) must be >= backoff \(2\)"),
        ({"deadline": math.inf}, "deadline must be a positive, finite"),
        ({"retry_on": ()}, "retry_on must name at least one exception class"),
        ({"retry_on": (BaseException,)}, "cancellation always propagates"),
    ],
)
def test_retry_options_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Retry(**options)
