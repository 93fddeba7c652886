"""The three strategies, on the memory backend and in Lua on Redis, against a fake clock."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_asyncio

from asgi_resilience.ratelimit import (
    GCRA,
    Backend,
    Decision,
    FixedWindow,
    MemoryBackend,
    Rate,
    SlidingWindow,
    StrategyName,
    parse_rates,
    strategy_for,
)
from asgi_resilience.ratelimit.redis import RedisBackend
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

T0 = 1_080_000.0  # a multiple of a second, a minute and an hour: window edges are known
STRATEGIES: list[StrategyName] = ["gcra", "fixed-window", "sliding-window"]

# Every test below runs on the memory backend (asyncio and trio) and on Redis. RedisBackend wraps
# redis-py's asyncio client, which only runs on asyncio: the Redis case is pinned to it.
STORES = pytest.mark.parametrize(
    ("anyio_backend", "store"),
    [
        ("asyncio", "memory"),
        ("trio", "memory"),
        pytest.param("asyncio", "redis", marks=pytest.mark.redis),
    ],
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def backend(
    store: str, clock: FakeClock, request: pytest.FixtureRequest
) -> AsyncIterator[Backend]:
    if store == "memory":
        yield MemoryBackend(clock=clock)
        return
    url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    backend = RedisBackend(redis_asyncio.from_url(url), prefix=prefix, clock=clock)
    try:
        yield backend
    finally:
        await backend.aclose()  # its connections and the client


async def decide(
    backend: Backend, strategy: StrategyName, limit: str, cost: int = 1, key: str = "client"
) -> Decision:
    return await backend.decide(strategy_for(strategy), key, parse_rates(limit), cost)


def remaining(decision: Decision) -> list[int]:
    return [status.remaining for status in decision.statuses]


# Where a "3/second" sequence starts, how long the fourth request must wait (GCRA's emission
# interval; the rest of the fixed window; the rest of the window plus the third of the next one
# after which the three requests, carried over and weighted, leave room for one more) and what
# remains once it is admitted.
THREE_PER_SECOND = {
    "gcra": (0.0, 1 / 3, 0),
    "fixed-window": (0.25, 0.75, 2),
    "sliding-window": (0.25, 0.75 + 1 / 3, 0),
}


@STORES
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_three_per_second_admits_three_then_exactly_at_the_edge(
    backend: Backend, clock: FakeClock, strategy: StrategyName
) -> None:
    start, wait, left = THREE_PER_SECOND[strategy]
    clock.now = T0 + start
    admitted = [await decide(backend, strategy, "3/second") for _ in range(3)]
    assert [d.allowed for d in admitted] == [True, True, True]
    assert [d.retry_after for d in admitted] == [0.0, 0.0, 0.0]
    assert [remaining(d) for d in admitted] == [[2], [1], [0]]
    denied = await decide(backend, strategy, "3/second")
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(wait, abs=1e-9)

    clock.now = T0 + start + wait - 1e-3
    assert not (await decide(backend, strategy, "3/second")).allowed
    clock.now = T0 + start + denied.retry_after
    again = await decide(backend, strategy, "3/second")
    assert again.allowed
    assert remaining(again) == [left]


# remaining and reset_after after each of three admitted "3/second" requests, then on the denial.
STATUSES = {
    "gcra": [(2, 1 / 3), (1, 2 / 3), (0, 1.0), (0, 1.0)],
    "fixed-window": [(2, 0.75), (1, 0.75), (0, 0.75), (0, 0.75)],
    "sliding-window": [(2, 1.75), (1, 1.75), (0, 1.75), (0, 1.75)],
}


@STORES
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_remaining_and_reset_after(
    backend: Backend, clock: FakeClock, strategy: StrategyName
) -> None:
    clock.now = T0 + THREE_PER_SECOND[strategy][0]
    decisions = [await decide(backend, strategy, "3/second") for _ in range(4)]
    expected = STATUSES[strategy]
    assert [d.statuses[0].remaining for d in decisions] == [n for n, _ in expected]
    resets = [d.statuses[0].reset_after for d in decisions]
    assert resets == pytest.approx([reset for _, reset in expected], abs=1e-9)
    assert all(d.statuses[0].rate == parse_rates("3/second")[0] for d in decisions)
    assert decisions[0].tightest is decisions[0].statuses[0]
    if strategy != "gcra":
        clock.now = T0 + 10  # long after: a fresh start
        assert remaining(await decide(backend, strategy, "3/second")) == [2]


# "2/second;3/minute" from T0: (seconds after T0, admitted, remaining per rate, retry_after).
TWO_RATES: dict[str, list[tuple[float, bool, list[int], float]]] = {
    "gcra": [
        (0, True, [1, 2], 0),
        (0, True, [0, 1], 0),
        (0, False, [0, 1], 0.5),  # the per-second rate says no; the minute would allow
        (2.5, True, [1, 0], 0),
        (5, False, [2, 0], 15),  # the minute says no; the per-second budget is untouched
        (5, False, [2, 0], 15),
        (20, True, [1, 0], 0),
    ],
    "fixed-window": [
        (0, True, [1, 2], 0),
        (0, True, [0, 1], 0),
        (0, False, [0, 1], 1),
        (2.5, True, [1, 0], 0),
        (5, False, [2, 0], 55),
        (5, False, [2, 0], 55),
        (60, True, [1, 2], 0),
    ],
    "sliding-window": [
        (0, True, [1, 2], 0),
        (0, True, [0, 1], 0),
        (0, False, [0, 1], 1.5),
        (2.5, True, [1, 0], 0),
        (5, False, [2, 0], 75),
        (5, False, [2, 0], 75),
        (80, True, [1, 0], 0),
    ],
}


@STORES
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_every_rate_must_pass_and_a_denial_consumes_nothing(
    backend: Backend, clock: FakeClock, strategy: StrategyName
) -> None:
    expected = TWO_RATES[strategy]
    observed = []
    for offset, *_ in expected:
        clock.now = T0 + offset
        decision = await decide(backend, strategy, "2/second;3/minute")
        observed.append((offset, decision.allowed, remaining(decision), decision.retry_after))
    assert [o[:3] for o in observed] == [e[:3] for e in expected]
    assert [o[3] for o in observed] == pytest.approx([e[3] for e in expected], abs=1e-9)


# "10/second;1000/hour", cost 10 every 2 s from T0: admitted before the hour says no, then the
# hourly status and retry_after. GCRA drains 1000/3600 per second meanwhile, hence more.
HOURLY = {
    "gcra": (105, 8, 6.0),
    "fixed-window": (100, 0, 3400.0),
    "sliding-window": (100, 0, 3436.0),
}


@STORES
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_per_second_and_hourly_rates_are_both_enforced(
    backend: Backend, clock: FakeClock, strategy: StrategyName
) -> None:
    limit = "10/second;1000/hour"
    burst = [await decide(backend, strategy, limit, key="burst") for _ in range(11)]
    assert [d.allowed for d in burst] == [True] * 10 + [False]
    assert remaining(burst[-1]) == [0, 990]

    admitted = 0
    while (decision := await decide(backend, strategy, limit, cost=10, key="steady")).allowed:
        admitted += 1
        clock.now += 2
        assert admitted <= 200
    count, hourly_left, retry_after = HOURLY[strategy]
    assert (admitted, remaining(decision)) == (count, [10, hourly_left])
    assert decision.retry_after == pytest.approx(retry_after)
    clock.now += decision.retry_after
    assert (await decide(backend, strategy, limit, cost=10, key="steady")).allowed


@STORES
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_cost_above_one(backend: Backend, clock: FakeClock, strategy: StrategyName) -> None:
    costs = [4, 4, 4, 3, 2, 1]
    decisions = [await decide(backend, strategy, "10/second", cost) for cost in costs]
    assert [d.allowed for d in decisions] == [True, True, False, False, True, False]
    assert [remaining(d) for d in decisions] == [[6], [2], [2], [2], [0], [0]]
    assert all(0 < d.retry_after < math.inf for d in decisions if not d.allowed)


@STORES
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_cost_above_the_amount_is_never_admitted(
    backend: Backend, clock: FakeClock, strategy: StrategyName
) -> None:
    limit = "10/second;1000/hour"
    for offset in (0, 0.5, 3600, 86400 * 7):
        clock.now = T0 + offset
        decision = await decide(backend, strategy, limit, cost=11)
        assert not decision.allowed
        assert decision.retry_after == math.inf
    fits = await decide(backend, strategy, limit, cost=10)
    assert fits.allowed and remaining(fits) == [0, 990]
    assert (await decide(backend, strategy, "5/minute", cost=6)).retry_after == math.inf


@STORES
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_retry_after_is_the_real_wait(
    backend: Backend, clock: FakeClock, strategy: StrategyName
) -> None:
    """A denied request is admitted at now + retry_after, and not a millisecond before."""
    rnd = random.Random(f"retry-after-{strategy}")
    limits = ["3/second", "2/second;3/minute", "5/10 seconds;20/minute", "4/2 seconds"]
    checked = 0
    for index, limit in enumerate(limits):
        key = f"client-{index}"
        smallest = min(rate.amount for rate in parse_rates(limit))
        for _ in range(60):
            cost = min(smallest, rnd.choice([1, 1, 2, 3]))
            decision = await decide(backend, strategy, limit, cost, key)
            if decision.allowed:
                clock.now += rnd.choice([0, 0, 1 / 64, 0.25, 1.5])
                continue
            checked += 1
            assert 0 < decision.retry_after < math.inf
            denied_at = clock.now
            if decision.retry_after > 2e-3:
                clock.now = denied_at + decision.retry_after - 1e-3
                assert not (await decide(backend, strategy, limit, cost, key)).allowed
            clock.now = denied_at + decision.retry_after
            assert (await decide(backend, strategy, limit, cost, key)).allowed
    assert checked > 50


# Rate sets for the Python/Lua comparison: one rate, two, uneven periods, a large amount.
RATE_SETS = [
    "3/second",
    "2/second;3/minute",
    "10/second;1000/hour",
    "5/30 seconds;7/minute",
    "4/2 seconds;9/10 seconds",
    "50/7 seconds",
]


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # RedisBackend: asyncio only
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_python_and_lua_decide_alike(
    strategy: StrategyName, clock: FakeClock, redis_url: str, redis_prefix: str
) -> None:
    """Both backends, fed the same requests at the same (fake) times, give equal decisions.

    Times move in steps of 1/64 s (or not at all): Redis expires keys on its own clock, so a key
    must never outlive its state in fake time by less than the real time the test takes.
    """
    rnd = random.Random(f"parity-{strategy}")
    memory = MemoryBackend(clock=clock)
    one_rate = MemoryBackend(clock=clock)  # one rate: the rate limiter's path, decide_rate
    client = redis_asyncio.from_url(redis_url)
    lua = RedisBackend(client, prefix=redis_prefix, clock=clock)
    implementation = strategy_for(strategy)
    outcomes = set()
    try:
        for limit in RATE_SETS:
            rates = parse_rates(limit)
            clock.now = T0 + rnd.randint(0, 64 * 3600) / 64
            for step in range(400):
                steps = [0, 0, rnd.randint(1, 16) / 64, rnd.randint(1, 256) / 64]
                clock.now += rnd.choice([*steps, rnd.randint(1, 64) * rates[-1].period / 64])
                # A cost of 0 consumes nothing: it asks where every rate stands.
                cost = rnd.choice([0, 1, 1, 1, 2, 3, rates[0].amount, rates[0].amount + 1])
                expected = memory.decide_now(implementation, limit, rates, cost)
                actual = await lua.decide(implementation, limit, rates, cost)
                assert actual == expected, (limit, step, clock.now, cost)
                if len(rates) == 1:  # the one-rate path, held to Lua too
                    [status] = actual.statuses
                    flat = (actual.allowed, status.remaining, status.reset_after)
                    answer = one_rate.decide_with(implementation.decide_rate, limit, rates[0], cost)
                    assert answer == (*flat, actual.retry_after)
                    assert one_rate._entries.get(limit) == memory._entries.get(limit)
                outcomes.add((expected.allowed, math.isinf(expected.retry_after)))
    finally:
        await lua.aclose()
    assert outcomes == {(True, False), (False, False), (False, True)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_state_stored_for_fewer_rates_counts_for_those_rates(
    strategy: StrategyName, clock: FakeClock
) -> None:
    # Two limiters sharing a MemoryBackend and a bucket with different limits: the stored
    # numbers cover fewer rates than the policy has. The rates they cover keep their counts,
    # the others start afresh, as the Lua scripts read missing numbers (Redis keys name the
    # rates, so there it cannot happen). It used to raise IndexError.
    memory = MemoryBackend(clock=clock)
    implementation = strategy_for(strategy)
    for _ in range(2):
        assert memory.decide_now(implementation, "k", parse_rates("3/second"), 1).allowed
    clock.advance(0.25)
    rates = parse_rates("3/second;5/minute")
    admitted = memory.decide_now(implementation, "k", rates, 1)
    assert admitted.allowed
    assert remaining(admitted) == [0, 4]
    assert not memory.decide_now(implementation, "k", rates, 1).allowed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100/minute", [(100, 60.0, "100-per-60s")]),
        ("10/second;1000/hour", [(10, 1.0, "10-per-1s"), (1000, 3600.0, "1000-per-3600s")]),
        ("5/30 seconds", [(5, 30.0, "5-per-30s")]),
        ("7 per 2.5 min", [(7, 150.0, "7-per-150s")]),
        (" 3 / SECOND ", [(3, 1.0, "3-per-1s")]),
        ("2/h, 3/d", [(2, 3600.0, "2-per-3600s"), (3, 86400.0, "3-per-86400s")]),
        ("1/s; 4/sec; 5/mins; 6/days;", [(1, 1.0), (4, 1.0), (5, 60.0), (6, 86400.0)]),
        ("1 per 0.5 seconds", [(1, 0.5, "1-per-0.5s")]),
    ],
)
def test_parse_rates_accepts(text: str, expected: list[tuple[object, ...]]) -> None:
    rates = parse_rates(text)
    observed = [
        (r.amount, r.period, r.name)[: len(e)] for r, e in zip(rates, expected, strict=True)
    ]
    assert observed == expected
    assert rates[0].interval == rates[0].period / rates[0].amount


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no rate in ''"),
        (" ; , ", "no rate"),
        ("100", "invalid rate '100'.*expected '<count>/<unit>'"),
        ("abc", "invalid rate 'abc'"),
        ("10/fortnight", "invalid rate '10/fortnight'.*units: second, minute, hour, day"),
        ("10/ms", "invalid rate '10/ms'"),
        ("1.5/second", "invalid rate '1.5/second'"),
        ("-1/second", "invalid rate '-1/second'"),
        ("10/second;bogus", "invalid rate 'bogus' in '10/second;bogus'"),
        ("0/second", "at least 1 request"),
        ("10/0 seconds", "period must be positive"),
    ],
)
def test_parse_rates_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rates(text)


def test_rate_and_strategy_validation() -> None:
    with pytest.raises(ValueError, match="at least 1 request"):
        Rate(0, 60.0, "none")
    with pytest.raises(ValueError, match="period must be positive"):
        Rate(1, -1.0, "backwards")
    with pytest.raises(ValueError, match=r"unknown strategy 'leaky-bucket'.*gcra"):
        strategy_for("leaky-bucket")
    assert [type(strategy_for(name)) for name in STRATEGIES] == [GCRA, FixedWindow, SlidingWindow]
    assert [strategy_for(name).name for name in STRATEGIES] == STRATEGIES
