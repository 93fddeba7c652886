"""MemoryBackend: bounded by max_keys (LRU), expired lazily, long keys hashed."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from asgi_resilience.ratelimit import Decision, MemoryBackend, Rate, StrategyName, parse_rates
from asgi_resilience.ratelimit.strategies import strategy_for
from tests.fakes import FakeClock

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES: list[StrategyName] = ["gcra", "fixed-window", "sliding-window"]
T0 = 1_080_000.0


def decide(
    backend: MemoryBackend, key: str, limit: str = "2/hour", strategy: StrategyName = "gcra"
) -> Decision:
    return backend.decide_now(strategy_for(strategy), key, parse_rates(limit), 1)


def remaining(decision: Decision) -> int:
    return decision.statuses[0].remaining


# Run in a fresh interpreter so the resident set size measures nothing but the backend.
MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from asgi_resilience.ratelimit import MemoryBackend, parse_rates, strategy_for

    def rss_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    max_keys, total = int(sys.argv[1]), int(sys.argv[2])
    strategy, rates = strategy_for("sliding-window"), parse_rates("10/second;1000/hour")
    backend = MemoryBackend(max_keys=max_keys, clock=lambda: 1_080_000.0)
    decide = backend.decide_now
    before = rss_kib()
    for n in range(max_keys):
        decide(strategy, f"ip:198.51.{n}", rates, 1)
    full = rss_kib()
    largest = len(backend)
    for n in range(max_keys, total):
        decide(strategy, f"ip:198.51.{n}", rates, 1)
        if n % 1000 == 0:
            largest = max(largest, len(backend))
    print(json.dumps({"before": before, "full": full, "after": rss_kib(),
                      "largest": largest, "final": len(backend)}))
    """
)


def test_a_million_keys_stay_within_max_keys_and_bounded_memory() -> None:
    max_keys, total = 10_000, 1_000_000
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(max_keys), str(total)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    kib = json.loads(result.stdout)
    assert kib["largest"] <= max_keys and kib["final"] == max_keys
    per_key = (kib["full"] - kib["before"]) / max_keys  # what one stored key costs
    unbounded = per_key * total  # 1,000,000 keys kept: hundreds of MiB
    growth = kib["after"] - kib["full"]  # 990,000 more keys, all through a full backend
    assert per_key > 0.1
    assert growth < max(4 * 1024, unbounded / 20), kib


def test_least_recently_used_keys_are_evicted_first() -> None:
    backend = MemoryBackend(max_keys=3, clock=FakeClock(T0))
    for key in ("a", "b", "c", "a"):  # "a" used again: "b" is now the least recently used
        decide(backend, key)
    assert remaining(decide(backend, "d")) == 1  # evicts "b"
    assert len(backend) == 3
    assert not decide(backend, "a").allowed  # "a" kept its count
    assert remaining(decide(backend, "c")) == 0  # "c" too; now ordered d, c (and a)
    assert remaining(decide(backend, "b")) == 1  # "b" starts afresh; this evicts the next one
    assert len(backend) == 3


def test_a_denied_client_counts_as_recently_used() -> None:
    """A client hammering while denied stays known: idle clients are evicted before it.

    Otherwise a limited client regains a full budget as soon as ``max_keys`` other clients were
    admitted after its last admitted request, however often it was refused meanwhile.
    """
    backend = MemoryBackend(max_keys=2, clock=FakeClock(T0))
    assert decide(backend, "hammering", "1/hour").allowed
    assert decide(backend, "idle", "1/hour").allowed
    assert not decide(backend, "hammering", "1/hour").allowed  # used, most recently
    assert decide(backend, "newcomer", "1/hour").allowed  # must evict "idle"
    assert not decide(backend, "hammering", "1/hour").allowed


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expired_keys_start_afresh_lazily(strategy: StrategyName) -> None:
    clock = FakeClock(T0)
    backend = MemoryBackend(clock=clock)
    first = decide(backend, "client", "2/minute", strategy)
    second = decide(backend, "client", "2/minute", strategy)
    assert (remaining(first), remaining(second)) == (1, 0)
    clock.now += 60 * 2 + 1  # past every strategy's time to live
    assert len(backend) == 1  # nothing runs in the background: the entry is still there
    assert decide(backend, "client", "2/minute", strategy) == decide(
        MemoryBackend(clock=clock), "client", "2/minute", strategy
    )
    assert remaining(decide(backend, "client", "2/minute", strategy)) == 0
    assert len(backend) == 1


def test_long_keys_are_hashed() -> None:
    backend = MemoryBackend(clock=FakeClock(T0))
    api_key = "key:" + "s3cr3t-" * 20
    short = "k" * 64
    assert decide(backend, api_key).allowed
    assert decide(backend, api_key).allowed
    assert not decide(backend, api_key).allowed  # one budget for the long key
    assert decide(backend, api_key[:-1] + "X").allowed  # another key, another budget
    decide(backend, short)
    stored = set(backend._entries)  # what the backend holds on to, for this test only
    assert hashlib.sha256(api_key.encode()).hexdigest() in stored
    assert short in stored  # up to 64 characters: kept as is
    assert not any("s3cr3t" in key for key in stored)
    assert all(len(key) <= 64 for key in stored)


@pytest.mark.anyio
async def test_aclose_forgets_everything() -> None:
    backend = MemoryBackend(clock=FakeClock(T0))
    rates = parse_rates("1/hour")
    assert (await backend.decide(strategy_for("gcra"), "client", rates, 1)).allowed
    assert not (await backend.decide(strategy_for("gcra"), "client", rates, 1)).allowed
    await backend.aclose()
    assert len(backend) == 0
    assert (await backend.decide(strategy_for("gcra"), "client", rates, 1)).allowed


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_keys must be >= 1, got 0"):
        MemoryBackend(max_keys=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("limit", ["5/second", "3/minute", "1/hour", "7/2.5second"])
def test_the_one_rate_path_decides_and_keeps_state_as_the_general_one(
    strategy: StrategyName, limit: str
) -> None:
    # The rate limiter's path for a policy of one rate (decide_rate, in plain numbers, for every
    # strategy) against Strategy.decide (a Decision), for that rate alone and behind a rate that
    # never binds: same answers, same stored numbers, evictions and expiries, over a long random
    # run. (test_python_and_lua_decide_alike holds both to the Lua scripts.)
    import random

    [rate] = parse_rates(limit)
    # Never binds, and resets no later than ``rate`` (same period, a far smaller interval): in
    # front of it, the stored numbers and their time to live are rate's, one rate further on.
    never_binds = Rate(1_000_000_000, rate.period, "never")
    implementation = strategy_for(strategy)
    clock = FakeClock(T0)
    one, general, paired = (MemoryBackend(max_keys=3, clock=clock) for _ in range(3))
    chance = random.Random(f"{strategy}-{limit}")
    keys = ["a", "b", "c", "d", "k" * 100]  # five keys over three slots; one hashed
    outcomes = set()
    for _ in range(3000):
        clock.advance(chance.choice([0, 0, 0.001, rate.interval / 3, rate.interval, rate.period]))
        key = chance.choice(keys)
        cost = chance.choice([0, 1, 1, 1, 2, rate.amount, rate.amount + 1])
        decision = general.decide_now(implementation, key, [rate], cost)
        [status] = decision.statuses
        expected = (decision.allowed, status.remaining, status.reset_after, decision.retry_after)
        assert one.decide_with(implementation.decide_rate, key, rate, cost) == expected
        assert list(one._entries.items()) == list(general._entries.items())
        behind = paired.decide_now(implementation, key, [never_binds, rate], cost)
        assert (behind.allowed, behind.statuses[1], behind.retry_after) == (
            decision.allowed,
            status,
            decision.retry_after,
        )
        slots = implementation.slots
        assert [(k, (numbers[slots:], ttl)) for k, (numbers, ttl) in paired._entries.items()] == [
            (k, (numbers, ttl)) for k, (numbers, ttl) in one._entries.items()
        ]
        outcomes.add((decision.allowed, math.isinf(decision.retry_after)))
    assert outcomes == {(True, False), (False, False), (False, True)}
