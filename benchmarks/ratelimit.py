"""Rate limit decision cost per strategy and backend.

Memory: microseconds per decision, fastest of 7 rounds (``MemoryBackend.decide_now``, 10,000
clients in rotation; for GCRA with one rate also ``decide_gcra``, the middleware's path).
Redis (``REDIS_URL``, default ``redis://127.0.0.1:6379/0``): milliseconds per decision over
loopback and the Redis commands each decision costs (from ``INFO commandstats``: one
``EVALSHA`` is one round trip). The middleware's own overhead on the ASGI benchmark is in
``python -m benchmarks.overhead``.

    python -m benchmarks.ratelimit [--decisions 20000] [--redis-decisions 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from time import perf_counter

from asgi_resilience.ratelimit import MemoryBackend, parse_rates, strategy_for

STRATEGIES = ("gcra", "fixed-window", "sliding-window")
RATES = parse_rates("1000000/second")  # never denies: every decision stores state


def memory_us(strategy_name: str, decisions: int, rounds: int = 7, fast: bool = False) -> float:
    """µs per ``decide_now``; with ``fast``, per ``decide_gcra`` (the middleware's path for
    GCRA with one rate)."""
    strategy = strategy_for(strategy_name)
    backend = MemoryBackend(max_keys=100_000)
    keys = [f"*|ip:10.0.{i // 256}.{i % 256}" for i in range(10_000)]
    [rate] = RATES
    samples = []
    for _ in range(rounds):
        start = perf_counter()
        if fast:
            for i in range(decisions):
                backend.decide_gcra(keys[i % 10_000], rate, 1)
        else:
            for i in range(decisions):
                backend.decide_now(strategy, keys[i % 10_000], RATES, 1)
        samples.append((perf_counter() - start) / decisions * 1e6)
    # The fastest round, as timeit reports: slower rounds measure other processes, not this.
    return min(samples)


async def redis_figures(url: str, strategy_name: str, decisions: int) -> tuple[float, float]:
    import redis.asyncio as redis_asyncio

    from asgi_resilience.ratelimit.redis import RedisBackend

    client = redis_asyncio.from_url(url)
    prefix = f"bench:{uuid.uuid4().hex}:"
    backend = RedisBackend(client, prefix=prefix)
    strategy = strategy_for(strategy_name)
    try:
        await backend.decide(strategy, "warm-up", RATES, 1)  # loads the script once
        before = await client.info("commandstats")
        start = perf_counter()
        for i in range(decisions):
            await backend.decide(strategy, f"ip:10.0.0.{i % 250}", RATES, 1)
        elapsed = perf_counter() - start
        after = await client.info("commandstats")
        # Commands a client sends (Lua's own GET/SET/TIME are counted by Redis too, but they
        # run inside the server): each EVALSHA or EVAL is one round trip.
        round_trips = sum(
            after[name]["calls"] - before.get(name, {"calls": 0})["calls"]
            for name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load")
            if name in after
        )
        per_decision = round_trips / decisions
        async for key in client.scan_iter(match=f"{prefix}*"):
            await client.delete(key)
        return elapsed / decisions * 1000, per_decision
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--redis-decisions", type=int, default=2_000)
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    print(f"{'strategy':<16} {'memory µs':>10} {'redis ms':>9} {'round trips':>12}")
    for name in STRATEGIES:
        memory = memory_us(name, args.decisions)
        try:
            redis_ms, commands = asyncio.run(redis_figures(url, name, args.redis_decisions))
            redis_part = f"{redis_ms:>9.3f} {commands:>12.2f}"
        except OSError as exc:
            redis_part = f"  (Redis unreachable: {exc})"
        print(f"{name:<16} {memory:>10.2f} {redis_part}")
    fast = memory_us("gcra", args.decisions, fast=True)
    print(f"{'gcra, one rate':<16} {fast:>10.2f}    (decide_gcra: the middleware's path)")


if __name__ == "__main__":
    main()
