"""RedisBackend on a real Redis Cluster and a real Sentinel set (servers the fixtures start)."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from asgi_resilience import resilient
from asgi_resilience.ratelimit import BackendError, RateLimitMiddleware, parse_rates, strategy_for
from asgi_resilience.ratelimit.redis import RedisBackend
from tests.redis_servers import RedisServer, SentinelSet, redis_cluster, redis_sentinel
from tests.test_lifespan import failed_startup_with_manager
from tests.test_ratelimit_redis import ok_app, request

pytestmark = [
    pytest.mark.redis,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),  # redis.asyncio: asyncio only
]
__all__ = ["redis_cluster", "redis_sentinel"]  # fixtures


def cluster_url(nodes: list[RedisServer]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes[:2])


async def burst(app: RateLimitMiddleware, count: int, peers: int = 1) -> collections.Counter[int]:
    responses = await asyncio.gather(
        *(request(app, peer=f"198.51.100.{i % peers + 1}") for i in range(count))
    )
    return collections.Counter(response.status for response in responses)


async def test_a_cluster_url_is_exact_under_a_burst_on_every_node(
    redis_cluster: list[RedisServer],
) -> None:
    backend = RedisBackend.from_url(cluster_url(redis_cluster))
    app = RateLimitMiddleware(ok_app, limit="50/day", backend=backend)
    try:
        await backend.ping()
        # 40 clients: their keys fall on all three nodes; each admits exactly 50.
        statuses = await burst(app, 40 * 120, peers=40)
    finally:
        await backend.aclose()
    assert statuses == {200: 40 * 50, 429: 40 * 70}
    assert app.backend_errors == 0
    owners = set()
    for node in redis_cluster:
        with node.client() as client:
            if client.dbsize():
                owners.add(node.port)
    assert len(owners) == 3


async def test_a_moved_slot_is_followed(redis_cluster: list[RedisServer]) -> None:
    backend = RedisBackend.from_url(cluster_url(redis_cluster[:1]))
    gcra, rates = strategy_for("gcra"), parse_rates("5/day")
    try:
        assert (await backend.decide(gcra, "client", rates, 1)).statuses[0].remaining == 4
        # Hand the key's slot to another node, as a resharding does.
        key = backend.key_for(gcra, "client", rates)
        with redis_cluster[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        owner = next(n for n in redis_cluster if _owns(n, slot))
        target = next(n for n in redis_cluster if n is not owner)
        with target.client() as client:
            target_id = client.execute_command("CLUSTER", "MYID").decode()
        with owner.client() as client:
            value = client.get(key)
            client.delete(key)
        for node in redis_cluster:
            with node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        with target.client() as client:
            client.set(key, value, ex=86400)
        decision = await backend.decide(gcra, "client", rates, 1)
        assert decision.statuses[0].remaining == 3  # the same state, on its new node
        assert f"127.0.0.1:{target.port}" in backend.connections
    finally:
        await backend.aclose()


def _owns(node: RedisServer, slot: int) -> bool:
    with node.client() as client:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    return any(
        int(start) <= slot <= int(end) and int(primary[1]) == node.port
        for start, end, primary, *_ in ranges
    )


async def test_a_cluster_client_is_followed_too(redis_cluster: list[RedisServer]) -> None:
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", redis_cluster[1].port)])
    backend = RedisBackend(client)
    app = RateLimitMiddleware(ok_app, limit="10/day", backend=backend)
    try:
        assert await burst(app, 30) == {200: 10, 429: 20}
    finally:
        await backend.aclose()


async def test_a_plain_url_at_a_cluster_node_fails_startup_naming_redis_cluster(
    redis_cluster: list[RedisServer],
) -> None:
    app = resilient(ok_app, rate_limit="5/minute", rate_limit_backend=redis_cluster[0].url)
    error = await failed_startup_with_manager(app)
    assert "check 'rate-limit-backend' failed" in str(error)
    assert "use a 'redis+cluster://host:port' URL" in str(error)


async def test_a_moved_reply_on_a_plain_url_names_redis_cluster(
    redis_cluster: list[RedisServer],
) -> None:
    backends = [RedisBackend.from_url(node.url) for node in redis_cluster]
    gcra, rates = strategy_for("gcra"), parse_rates("5/day")
    errors = []
    try:
        for backend in backends:
            try:
                await backend.decide(gcra, "client", rates, 1)
            except BackendError as exc:
                errors.append(str(exc))
    finally:
        for backend in backends:
            await backend.aclose()
    assert len(errors) == 2  # one node owns the key; the other two redirect
    assert all("redis+cluster://" in error for error in errors)


async def test_a_sentinel_url_decides_and_follows_a_failover(
    redis_sentinel: SentinelSet,
) -> None:
    backend = RedisBackend.from_url(redis_sentinel.url)
    gcra, rates = strategy_for("gcra"), parse_rates("100/day")
    first = redis_sentinel.master_port()
    try:
        await backend.ping()
        assert (await backend.decide(gcra, "client", rates, 1)).statuses[0].remaining == 99
        with redis_sentinel.sentinel.client() as client:
            client.execute_command("SENTINEL", "FAILOVER", "mymaster")
        deadline = time.monotonic() + 30
        remaining = None
        while time.monotonic() < deadline:
            try:
                decision = await backend.decide(gcra, "client", rates, 1)
            except BackendError:
                await asyncio.sleep(0.05)
                continue
            remaining = decision.statuses[0].remaining
            if backend.connections != [f"127.0.0.1:{first}"]:
                break
            await asyncio.sleep(0.05)
        assert redis_sentinel.master_port() != first
        assert backend.connections == [f"127.0.0.1:{redis_sentinel.master_port()}"]
        assert remaining is not None and remaining < 98  # the state came along (replicated)
    finally:
        await backend.aclose()


async def test_a_sentinel_client_is_followed(redis_sentinel: SentinelSet) -> None:
    sentinel = Sentinel([("127.0.0.1", redis_sentinel.sentinel_port)])  # type: ignore[no-untyped-call]
    backend = RedisBackend(sentinel.master_for("mymaster"))
    app = RateLimitMiddleware(ok_app, limit="10/day", backend=backend)
    try:
        assert await burst(app, 25) == {200: 10, 429: 15}
        assert backend.connections == [f"127.0.0.1:{redis_sentinel.master.port}"]
    finally:
        await backend.aclose()


async def test_an_unknown_service_fails_the_ping(redis_sentinel: SentinelSet) -> None:
    url = f"redis+sentinel://127.0.0.1:{redis_sentinel.sentinel_port}/nobody"
    backend = RedisBackend.from_url(url)
    try:
        with pytest.raises(BackendError, match="knows no master named 'nobody'"):
            await backend.ping()
    finally:
        await backend.aclose()


async def test_a_plain_url_at_a_replica_fails_the_ping(redis_sentinel: SentinelSet) -> None:
    backend = RedisBackend.from_url(redis_sentinel.replica.url)
    try:
        with pytest.raises(BackendError, match="is a replica, not the master"):
            await backend.ping()
    finally:
        await backend.aclose()
