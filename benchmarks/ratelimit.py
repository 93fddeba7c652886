"""Rate limit decision cost per strategy and backend.

Memory: microseconds per decision, fastest of 7 rounds (``MemoryBackend.decide_now``, 10,000
clients in rotation; also ``decide_with(strategy.decide_rate, ...)``, the middleware's path for a
policy of one rate).
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
from typing import Any

from asgi_resilience.ratelimit import BackendError, MemoryBackend, parse_rates, strategy_for

STRATEGIES = ("gcra", "fixed-window", "sliding-window")
RATES = parse_rates("1000000/second")  # never denies: every decision stores state


def memory_us(strategy_name: str, decisions: int, rounds: int = 7, fast: bool = False) -> float:
    """µs per ``decide_now``; with ``fast``, per ``decide_with(strategy.decide_rate, ...)`` (the
    middleware's path for a policy of one rate)."""
    strategy = strategy_for(strategy_name)
    backend = MemoryBackend(max_keys=100_000)
    keys = [f"*|ip:10.0.{i // 256}.{i % 256}" for i in range(10_000)]
    [rate] = RATES
    samples = []
    for _ in range(rounds):
        start = perf_counter()
        if fast:
            for i in range(decisions):
                backend.decide_with(strategy.decide_rate, keys[i % 10_000], rate, 1)
        else:
            for i in range(decisions):
                backend.decide_now(strategy, keys[i % 10_000], RATES, 1)
        samples.append((perf_counter() - start) / decisions * 1e6)
    # The fastest round, as timeit reports: slower rounds measure other processes, not this.
    return min(samples)


async def commands_run(backend: Any) -> int:
    """Commands a client sent that Redis ran (``INFO commandstats``): each ``EVALSHA`` or
    ``EVAL`` is one decision's command; the scripts' own GET/SET/TIME run inside the server."""
    info = await backend.servers.call(b"", b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n", 5.0)
    total = 0
    for line in info.decode().splitlines():
        name, _, fields = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load"):
            total += int(fields.split(",")[0].partition("=")[2])
    return total


async def redis_figures(
    url: str, strategy_name: str, decisions: int, concurrency: int
) -> tuple[float, float]:
    """Decisions per second of one process with ``concurrency`` decisions in flight, and
    commands sent per decision (counted by Redis)."""
    from asgi_resilience.ratelimit.redis import RedisBackend

    prefix = f"bench:{uuid.uuid4().hex}:"
    backend = RedisBackend.from_url(url, prefix=prefix, timeout=1.0)
    strategy = strategy_for(strategy_name)
    try:
        await backend.decide(strategy, "warm-up", RATES, 1)  # connects, loads the scripts
        before = await commands_run(backend)
        counter = iter(range(decisions))

        async def worker() -> None:
            for i in counter:
                await backend.decide(strategy, f"ip:10.0.{i % 250}.{i % 7}", RATES, 1)

        start = perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = perf_counter() - start
        per_decision = (await commands_run(backend) - before - 1) / decisions  # less INFO's own
        return decisions / elapsed, per_decision
    finally:
        await backend.aclose()


async def burst_admitted(url: str, count: int) -> int:
    """Admitted of ``count`` simultaneous requests against ``50/minute`` shared through Redis
    by four middleware instances in one process (GCRA: 50, plus what refills meanwhile)."""
    from asgi_resilience.ratelimit import RateLimitMiddleware
    from asgi_resilience.ratelimit.redis import RedisBackend

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    prefix = f"bench:{uuid.uuid4().hex}:"
    backends = [RedisBackend.from_url(url, prefix=prefix) for _ in range(4)]
    apps = [RateLimitMiddleware(ok, limit="50/minute", backend=b) for b in backends]
    statuses: list[int] = []

    async def one(app: Any) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [],
            "client": ("203.0.113.5", 1),
        }
        await app(scope, receive, send)

    try:
        await asyncio.gather(*(one(apps[i % 4]) for i in range(count)))
    finally:
        for backend in backends:
            await backend.aclose()
    return statuses.count(200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--redis-decisions", type=int, default=20_000)
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    levels = (1, 100, 1000)
    header = "".join(f"{f'redis/s @{n}':>14}" for n in levels)
    print(f"{'strategy':<16} {'memory µs':>10}{header} {'commands/decision':>18}")
    for name in STRATEGIES:
        memory = memory_us(name, args.decisions)
        try:
            figures = [
                asyncio.run(redis_figures(url, name, args.redis_decisions, n)) for n in levels
            ]
            rates = "".join(f"{per_second:>14,.0f}" for per_second, _ in figures)
            redis_part = f"{rates} {max(c for _, c in figures):>18.2f}"
        except BackendError as exc:
            redis_part = f"  (Redis unreachable: {exc})"
        print(f"{name:<16} {memory:>10.2f}{redis_part}")
    for name in STRATEGIES:
        fast = memory_us(name, args.decisions, fast=True)
        print(f"{name + ', one rate':<16} {fast:>10.2f}    (decide_rate: the middleware's path)")
    try:
        bursts = {count: asyncio.run(burst_admitted(url, count)) for count in (200, 1000, 5000)}
        print(
            "admitted of a burst, 50/minute, 4 instances: "
            + ", ".join(f"{count:,} -> {admitted}" for count, admitted in bursts.items())
        )
    except BackendError as exc:
        print(f"bursts: Redis unreachable: {exc}")


if __name__ == "__main__":
    main()
