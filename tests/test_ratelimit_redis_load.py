"""The Redis rate limiter under load and faults: bursts, worker processes, a stalled, killed and
restarted Redis. Bounded in count and time, loopback only."""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from asgi_resilience import resilient
from asgi_resilience.ratelimit import RateLimitMiddleware
from asgi_resilience.ratelimit.redis import RedisBackend
from asgi_resilience.types import ASGIApp
from tests.asgi import Response
from tests.redis_servers import RedisServer, own_redis
from tests.test_ratelimit_redis import four_uvicorn_workers, ok_app, request

pytestmark = [pytest.mark.redis, pytest.mark.anyio]
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio: asyncio only
__all__ = ["own_redis"]  # a fixture
ROOT = Path(__file__).resolve().parent.parent
GCRA_REFILL = 60 / 50  # seconds per unit of "50/minute"


def errors_counted(registry: CollectorRegistry) -> float:
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "asgi_resilience_rate_limit_decisions_total":
                total += sample.value if sample.labels["outcome"] == "error" else 0
    return total


@ASYNCIO_ONLY
@pytest.mark.parametrize("count", [200, 1000, 5000])
@pytest.mark.parametrize("on_error", ["allow", "deny"])
async def test_a_burst_across_four_stacks_admits_exactly_the_limit(
    redis_url: str, redis_prefix: str, count: int, on_error: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Four ``resilient()`` stacks sharing ``50/minute`` through Redis, default options."""
    registry = CollectorRegistry()
    backends = [RedisBackend.from_url(redis_url, prefix=redis_prefix) for _ in range(4)]
    stacks = [
        resilient(
            ok_app,
            rate_limit="50/minute",
            rate_limit_backend=backend,
            rate_limit_on_backend_error=on_error,  # type: ignore[arg-type]
            registry=registry if index == 0 else CollectorRegistry(),
        )
        for index, backend in enumerate(backends)
    ]
    caplog.set_level(logging.WARNING, "asgi_resilience.ratelimit")
    started = time.monotonic()
    try:
        responses = await asyncio.gather(*(request(stacks[i % 4]) for i in range(count)))
    finally:
        for backend in backends:
            await backend.aclose()
    elapsed = time.monotonic() - started
    statuses = collections.Counter(response.status for response in responses)
    refilled = math.floor(elapsed / GCRA_REFILL) + 1
    assert set(statuses) == {200, 429}, statuses
    assert 50 <= statuses[200] <= 50 + refilled, (statuses, elapsed)
    assert errors_counted(registry) == 0
    assert not [r for r in caplog.records if r.name == "asgi_resilience.ratelimit"]


@ASYNCIO_ONLY
async def test_three_bursts_of_a_thousand_use_one_connection(
    redis_url: str, redis_prefix: str
) -> None:
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    app = RateLimitMiddleware(ok_app, limit="50/minute", backend=backend)
    watcher = RedisBackend.from_url(redis_url)
    try:
        await watcher.ping()  # its own connection is open before counting
        before = await connections_received(watcher)
        for _ in range(3):
            responses = await asyncio.gather(*(request(app) for _ in range(1000)))
            assert all(response.status in (200, 429) for response in responses)
        assert await connections_received(watcher) - before == 1
        assert backend.connections == [redis_url.split("//")[1].split("/")[0]]
        assert app.backend_errors == 0
    finally:
        await backend.aclose()
        await watcher.aclose()


async def connections_received(backend: RedisBackend) -> int:
    info = await backend.servers.call(b"", b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n", 1.0)
    for line in info.decode().splitlines():
        if line.startswith("total_connections_received:"):
            return int(line.partition(":")[2])
    raise AssertionError(info)


TIMEOUT = 0.05
SLACK = 0.01  # the budget: within backend_timeout + 10 ms at p99


async def timed_wave(app: ASGIApp, count: int, peer: str) -> list[tuple[float, Response]]:
    async def one() -> tuple[float, Response]:
        started = time.perf_counter()
        response = await request(app, peer=peer)
        return time.perf_counter() - started, response

    return await asyncio.gather(*(one() for _ in range(count)))


async def until_exact_again(app: RateLimitMiddleware, within: float) -> float:
    """Seconds until a burst on a fresh client is decided exactly again (50 of 80)."""
    started = time.monotonic()
    attempt = 0
    while time.monotonic() - started < within + 1:
        attempt += 1
        response = await request(app, peer=f"192.0.2.{attempt}")
        if "ratelimit" in response.headers:
            break
        await asyncio.sleep(0.01)
    recovered = time.monotonic() - started
    errors = app.backend_errors
    responses = await asyncio.gather(*(request(app, peer="198.18.0.1") for _ in range(80)))
    statuses = collections.Counter(response.status for response in responses)
    assert statuses[200] in (50, 51) and app.backend_errors == errors, statuses
    return recovered


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[math.ceil(len(ordered) * 0.99) - 1]


@ASYNCIO_ONLY
@pytest.mark.parametrize("on_error", ["allow", "deny"])
@pytest.mark.parametrize("fault", ["stalled", "killed"])
async def test_a_stalled_or_killed_redis_answers_every_request_in_time_and_recovers(
    own_redis: RedisServer, tmp_path: Path, on_error: str, fault: str
) -> None:
    backend = RedisBackend.from_url(own_redis.url)
    registry = CollectorRegistry()
    app = RateLimitMiddleware(
        ok_app,
        limit="50/minute",
        backend=backend,
        on_backend_error=on_error,  # type: ignore[arg-type]
        registry=registry,
    )
    server = own_redis
    try:
        healthy = await timed_wave(app, 100, "203.0.113.1")
        errors_before = app.backend_errors
        assert collections.Counter(r.status for _, r in healthy) == {200: 50, 429: 50}
        if fault == "stalled":
            server.pause()
        else:
            server.stop()
        # 1.5 s of traffic through the fault: waves of 40 requests every 20 ms. What the test
        # process made before is frozen out of the collector: a full collection of a long test
        # run's objects pauses everything for 100 ms or more, which is no latency of ours.
        during: list[tuple[float, Response]] = []
        gc.collect()
        gc.freeze()
        started = time.monotonic()
        try:
            while time.monotonic() - started < 1.5:
                during += await timed_wave(app, 40, "203.0.113.2")
                await asyncio.sleep(0.02)
        finally:
            gc.unfreeze()
        errors = app.backend_errors - errors_before
        if fault == "stalled":
            server.resume()
        else:
            server = RedisServer(tmp_path / "again", port=server.port).start()
        recovered = await until_exact_again(app, within=1.0)
    finally:
        await backend.aclose()
        server.stop()
    latencies = [latency for latency, _ in during]
    assert max(latencies) < 1, max(latencies)  # nothing hangs
    assert p99(latencies) <= TIMEOUT + SLACK, p99(latencies)
    statuses = collections.Counter(response.status for _, response in during)
    undecided = [r for _, r in during if "ratelimit" not in r.headers]
    if on_error == "allow":
        assert set(statuses) == {200}, statuses
    else:
        assert set(statuses) == {503}, statuses
        assert undecided[0].json()["detail"] == "Rate limiting is unavailable"
    assert len(undecided) == len(during)  # none was decided by the stopped Redis
    # Failures are counted one for one, in the metric and on the middleware.
    assert errors == len(during)
    assert errors_counted(registry) == app.backend_errors
    assert recovered < 1.0


# --- over HTTP, several worker processes ----------------------------------------------------------


async def drive(port: int, connections: int, seconds: float) -> collections.Counter[int]:
    """Keep-alive GETs from ``connections`` connections for ``seconds``; statuses counted."""
    statuses: collections.Counter[int] = collections.Counter()
    deadline = time.monotonic() + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                statuses[status] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return statuses


@pytest.fixture
def four_workers(redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[int]:
    with four_uvicorn_workers(redis_url, redis_prefix, "50/minute", tmp_path) as (port, log):
        yield port
    assert "Rate limit backend failed" not in log.read_text()


@pytest.mark.parametrize("connections", [64, 256])
def test_four_uvicorn_workers_under_load_admit_no_more_than_the_limit(
    four_workers: int, connections: int, redis_url: str, redis_prefix: str
) -> None:
    started = time.monotonic()
    statuses = asyncio.run(drive(four_workers, connections, 5))
    elapsed = time.monotonic() - started
    refilled = math.floor(elapsed / GCRA_REFILL) + 1
    assert set(statuses) == {200, 429}, statuses
    assert sum(statuses.values()) >= 2000, statuses  # a real load, not a trickle
    assert 50 <= statuses[200] <= 50 + refilled, (statuses, elapsed)
