"""RedisBackend against a real Redis: round trips, NOSCRIPT, keys, processes, outages.

RedisBackend wraps redis-py's asyncio client, which runs on asyncio only: every async test here
is pinned to asyncio (``anyio_backend``) instead of running on trio too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis_asyncio

from asgi_resilience import resilient
from asgi_resilience.ratelimit import (
    RateLimitMiddleware,
    StrategyName,
    backend_from_url,
    parse_rates,
    strategy_for,
)
from asgi_resilience.ratelimit.pipe import Pipe
from asgi_resilience.ratelimit.redis import RedisBackend
from asgi_resilience.types import ASGIApp, Receive, Scope, Send
from tests.asgi import Response, call, http_scope
from tests.fakes import FakeClock

pytestmark = [pytest.mark.redis, pytest.mark.anyio]
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio: asyncio only

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES: list[StrategyName] = ["gcra", "fixed-window", "sliding-window"]
T0 = 1_080_000.0


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis_asyncio.Redis]:
    client = redis_asyncio.from_url(redis_url)
    yield client
    await client.aclose()


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def request(app: ASGIApp, peer: str = "203.0.113.5", **headers: str) -> Response:
    scope = http_scope(
        headers=[(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    )
    scope["client"] = (peer, 50000)
    return await call(app, scope)


# --- one round trip, NOSCRIPT ---------------------------------------------------------------------


async def command_calls(client: redis_asyncio.Redis) -> collections.Counter[str]:
    """Redis' own count of the commands it ran, by name (``INFO commandstats``)."""
    stats = await client.info("commandstats")
    return collections.Counter(
        {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    )


class Writes:
    """How many writes our connections make (each carries every command of one loop turn)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        flush = Pipe._flush

        def counting_flush(pipe: Pipe) -> None:
            self.count += 1
            flush(pipe)

        monkeypatch.setattr(Pipe, "_flush", counting_flush)


@ASYNCIO_ONLY
async def test_one_round_trip_per_decision(
    client: redis_asyncio.Redis, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backends = [
        RedisBackend.from_url(redis_url, prefix=prefix, clock=FakeClock(T0)),
        RedisBackend.from_url(redis_url, prefix=prefix),  # Redis' clock: TIME in the script
    ]
    try:
        await round_trips_of(backends, client, monkeypatch)
    finally:
        for backend in backends:
            await backend.aclose()


async def round_trips_of(
    backends: list[RedisBackend], client: redis_asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    rates = parse_rates("10/second;1000/hour")
    for backend in backends:
        for name in STRATEGIES:  # the first decision connects and loads the scripts
            assert (await backend.decide(strategy_for(name), "warm-up", rates, 1)).allowed
    writes = Writes(monkeypatch)
    before = await command_calls(client)
    decisions = 0
    for index, backend in enumerate(backends):
        for name in STRATEGIES:
            for n in range(5):
                await backend.decide(strategy_for(name), f"{index}-client-{n % 2}", rates, 1 + n)
                decisions += 1
    ran = await command_calls(client) - before
    assert ran["evalsha"] == decisions
    assert not {"eval", "script|load"} & set(ran)
    assert writes.count == decisions
    # Concurrent decisions share writes: a burst of 1,000 is one EVALSHA each, in a few writes.
    writes.count, before = 0, await command_calls(client)
    gcra = strategy_for("gcra")
    await asyncio.gather(*(backends[1].decide(gcra, f"c{i}", rates, 1) for i in range(1000)))
    assert (await command_calls(client) - before)["evalsha"] == 1000
    assert writes.count <= 3


@ASYNCIO_ONLY
async def test_a_lost_script_is_run_by_eval_in_the_same_decision(
    client: redis_asyncio.Redis, redis_url: str, prefix: str
) -> None:
    backend = RedisBackend.from_url(redis_url, prefix=prefix, clock=FakeClock(T0))
    gcra, rates = strategy_for("gcra"), parse_rates("3/minute")
    try:
        assert (await backend.decide(gcra, "client", rates, 1)).statuses[0].remaining == 2
        await client.script_flush()  # the server forgets every script (a restart, a failover)
        before = await command_calls(client)
        decision = await backend.decide(gcra, "client", rates, 1)
        assert decision.allowed and decision.statuses[0].remaining == 1  # state kept
        assert (await command_calls(client) - before)["eval"] == 1
        before = await command_calls(client)
        assert (await backend.decide(gcra, "client", rates, 1)).statuses[0].remaining == 0
        ran = await command_calls(client) - before
        assert ran["evalsha"] == 1 and "eval" not in ran  # EVAL cached it again
    finally:
        await backend.aclose()


# --- keys ----------------------------------------------------------------------------------------


@ASYNCIO_ONLY
async def test_keys_are_prefixed_hashed_and_expire(
    client: redis_asyncio.Redis, prefix: str
) -> None:
    address = f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"
    api_key = f"sk_live_{uuid.uuid4().hex}"
    backend = RedisBackend(client, prefix=prefix)
    by_ip = RateLimitMiddleware(ok_app, limit="5/minute", backend=backend)
    by_key = RateLimitMiddleware(
        ok_app, limit="5/minute;100/day", backend=backend, key="header:X-API-Key"
    )
    assert (await request(by_ip, peer=address)).headers["ratelimit"] == '"5-per-60s";r=4;t=12'
    assert (await request(by_key, peer=address, x_api_key=api_key)).status == 200
    keys = [key.decode() async for key in client.scan_iter(match=f"{prefix}*")]
    assert len(keys) == 2
    for key in keys:
        assert re.fullmatch(re.escape(prefix) + r"\{[0-9a-f]{40}\}", key)  # a cluster hash tag
        assert 0 < await client.pttl(key) <= 86_400_000
        value = await client.get(key)
        assert isinstance(value, bytes)
        assert re.fullmatch(rb"[0-9.e+\- ]+", value), value  # numbers only
    for secret in (address, api_key, api_key[8:]):
        assert not [key async for key in client.scan_iter(match=f"*{secret}*", count=1000)]
    assert backend.key_for(strategy_for("gcra"), address, parse_rates("5/minute")).startswith(
        prefix
    )
    await backend.aclose()


@ASYNCIO_ONLY
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_the_order_rates_are_written_in_changes_neither_key_nor_budget(
    redis_url: str, prefix: str, strategy: StrategyName
) -> None:
    backend = RedisBackend.from_url(redis_url, prefix=prefix, clock=FakeClock(T0))
    algorithm = strategy_for(strategy)
    written = [parse_rates("3/minute;100/hour"), parse_rates("100/hour , 3/minute")]
    assert backend.key_for(algorithm, "k", written[0]) == backend.key_for(
        algorithm, "k", written[1]
    )
    try:
        decisions = [await backend.decide(algorithm, "k", written[i % 2], 1) for i in range(4)]
    finally:
        await backend.aclose()
    assert [d.allowed for d in decisions] == [True, True, True, False]  # one budget of 3
    # Each decision reports its rates in the order they were written.
    assert [s.rate.amount for s in decisions[1].statuses] == [100, 3]
    assert [s.remaining for s in decisions[2].statuses] == [0, 97]
    assert [s.remaining for s in decisions[3].statuses] == [97, 0]


@ASYNCIO_ONLY
async def test_default_prefix_and_backend_urls(redis_url: str) -> None:
    backend = backend_from_url(redis_url)
    assert isinstance(backend, RedisBackend)
    assert backend.prefix == "asgi_resilience:rl:"
    key = backend.key_for(strategy_for("gcra"), "ip:203.0.113.5", parse_rates("1/second"))
    assert re.fullmatch(r"asgi_resilience:rl:\{[0-9a-f]{40}\}", key)
    await backend.aclose()


@ASYNCIO_ONLY
async def test_redis_time_is_used_without_a_clock(client: redis_asyncio.Redis, prefix: str) -> None:
    backend = RedisBackend(client, prefix=prefix)
    gcra, rates = strategy_for("gcra"), parse_rates("3/minute")
    decisions = [await backend.decide(gcra, "client", rates, 1) for _ in range(4)]
    await backend.aclose()
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.statuses[0].remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[3].retry_after == pytest.approx(20, abs=1)  # seconds on Redis' clock
    assert decisions[0].statuses[0].reset_after == pytest.approx(20, abs=1)


# --- N means N across processes ------------------------------------------------------------------

DECIDING_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as redis_asyncio
    from asgi_resilience.ratelimit import parse_rates, strategy_for
    from asgi_resilience.ratelimit.redis import RedisBackend

    async def main(url, prefix, strategy):
        client = redis_asyncio.from_url(url)
        backend = RedisBackend(client, prefix=prefix, clock=lambda: 1_080_000.5)
        rates, algorithm = parse_rates("100/hour"), strategy_for(strategy)
        await client.ping()
        print("ready", flush=True)
        sys.stdin.readline()  # everyone starts together
        decisions = await asyncio.gather(
            *(backend.decide(algorithm, "everyone", rates, 1) for _ in range(100))
        )
        print(sum(decision.allowed for decision in decisions), flush=True)
        await backend.aclose()

    asyncio.run(main(*sys.argv[1:4]))
    """
)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_four_processes_sharing_a_limit_of_100_admit_exactly_100(
    redis_url: str, prefix: str, strategy: StrategyName
) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", DECIDING_PROCESS, redis_url, prefix, strategy],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        admitted = [int(process.communicate(timeout=30)[0]) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert sum(admitted) == 100
    assert [process.returncode for process in processes] == [0, 0, 0, 0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def four_uvicorn_workers(
    redis_url: str, prefix: str, limit: str, tmp_path: Path
) -> Iterator[tuple[int, Path]]:
    """``tests.apps.ratelimited`` under ``uvicorn --workers 4`` on a free port: the port and
    the server's log, once every worker has started; stopped by its PID at the end."""
    port, log_path = free_port(), tmp_path / "uvicorn.log"
    env = {**os.environ, "REDIS_URL": redis_url, "RATE_LIMIT_PREFIX": prefix, "RATE_LIMIT": limit}
    command = [sys.executable, "-m", "uvicorn", "tests.apps.ratelimited:app", "--workers", "4"]
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*command, "--port", str(port), "--no-access-log"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while log_path.read_text().count("Application startup complete") < 4:
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        yield port, log_path
    finally:
        server.terminate()
        server.wait(15)


def test_four_uvicorn_workers_admit_exactly_100_of_400(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    # GCRA at 100/day: one more only after 864 s
    with four_uvicorn_workers(redis_url, prefix, "100/day", tmp_path) as (port, log_path):

        async def fire(count: int) -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=count)
            async with httpx.AsyncClient(limits=limits, timeout=30) as http:
                url = f"http://127.0.0.1:{port}/"
                return await asyncio.gather(*(http.get(url) for _ in range(count)))

        async def fire_all() -> list[httpx.Response]:
            # 400 requests in flight together, from 8 clients: one httpx pool handing out 400
            # connections at once takes seconds.
            batches = await asyncio.gather(*(fire(50) for _ in range(8)))
            return [response for batch in batches for response in batch]

        responses = asyncio.run(fire_all())
    statuses = collections.Counter(response.status_code for response in responses)
    assert statuses == {200: 100, 429: 300}, log_path.read_text()[-2000:]
    assert len({response.headers["x-worker-pid"] for response in responses}) >= 2


@ASYNCIO_ONLY
async def test_a_burst_larger_than_the_connection_pool_never_admits_more(
    redis_url: str, prefix: str
) -> None:
    """150 concurrent requests on one process, a limit of 100, a generous timeout: 100 pass.

    Nothing is wrong with Redis here; only the client's pool is too small for the burst.
    """
    backend = RedisBackend.from_url(redis_url, prefix=prefix)
    app = RateLimitMiddleware(ok_app, limit="100/day", backend=backend, backend_timeout=5)
    try:
        responses = await asyncio.gather(*(request(app) for _ in range(150)))
    finally:
        await backend.aclose()
    assert collections.Counter(r.status for r in responses) == {200: 100, 429: 50}
    assert app.backend_errors == 0


# --- when Redis goes away ------------------------------------------------------------------------


class TcpProxy:
    """127.0.0.1:<port> forwarded to Redis, in a thread of its own.

    ``stop()`` is Redis going away (connections closed, then refused), ``start()`` its return on
    the same port, ``hanging`` a network that swallows every byte.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.hanging = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _serve(self, listener: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        other_end: dict[socket.socket, socket.socket] = {}

        def close(sock: socket.socket) -> None:
            for end in (sock, other_end.pop(sock, None)):
                if end is not None:
                    other_end.pop(end, None)
                    selector.unregister(end)
                    end.close()

        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=0.01):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is listener:
                        downstream, _ = listener.accept()
                        upstream = socket.create_connection(self.target)
                        other_end[downstream], other_end[upstream] = upstream, downstream
                        selector.register(downstream, selectors.EVENT_READ)
                        selector.register(upstream, selectors.EVENT_READ)
                        continue
                    if sock not in other_end:
                        continue  # closed with its other end in this round
                    try:
                        data = sock.recv(65536)
                        if data and not self.hanging:
                            other_end[sock].sendall(data)
                    except OSError:
                        data = b""
                    if not data:
                        close(sock)
        finally:
            for sock in list(other_end):
                if sock in other_end:
                    close(sock)
            selector.close()
            listener.close()


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    parsed = httpx.URL(redis_url)
    proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 6379))
    proxy.start()
    yield proxy
    proxy.stop()


def timed(started: float) -> float:
    return time.perf_counter() - started


TIMEOUT = 0.05
SLACK = 0.025  # what "a few ms" over the timeout may take on a busy test machine


@ASYNCIO_ONLY
async def test_unreachable_redis_allow_admits_within_the_timeout_deny_answers_503() -> None:
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens
    allow = RateLimitMiddleware(ok_app, backend=backend, backend_timeout=TIMEOUT)
    deny = resilient(
        RateLimitMiddleware(
            ok_app, backend=backend, backend_timeout=TIMEOUT, on_backend_error="deny"
        )
    )
    try:
        for attempt in (1, 2, 3):
            started = time.perf_counter()
            response = await request(allow)
            assert timed(started) < TIMEOUT + SLACK
            assert (response.status, response.body) == (200, b"ok")
            assert "ratelimit" not in response.headers
            assert allow.backend_errors == attempt
        started = time.perf_counter()
        refused = await request(deny)
        assert timed(started) < TIMEOUT + SLACK
    finally:
        await backend.aclose()
    assert refused.status == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["request_id"] == refused.headers["x-request-id"]


async def until_decided(app: RateLimitMiddleware, attempts: int = 40) -> Response:
    """Requests until one is decided by Redis again (the client may back off once)."""
    for _ in range(attempts):
        response = await request(app)
        if "ratelimit" in response.headers:
            return response
        await asyncio.sleep(0.05)
    raise AssertionError("Redis decisions did not come back")


@ASYNCIO_ONLY
@pytest.mark.parametrize("outage", ["stopped", "hanging"])
async def test_redis_going_away_and_coming_back(proxy: TcpProxy, prefix: str, outage: str) -> None:
    backend = RedisBackend(
        redis_asyncio.Redis(host="127.0.0.1", port=proxy.port),
        prefix=prefix,
        clock=FakeClock(T0),
    )
    allow = RateLimitMiddleware(ok_app, limit="5/minute", backend=backend, backend_timeout=TIMEOUT)
    deny = resilient(
        RateLimitMiddleware(
            ok_app,
            limit="5/minute",
            backend=backend,
            backend_timeout=TIMEOUT,
            on_backend_error="deny",
        )
    )
    try:
        assert (await request(allow)).headers["ratelimit"] == '"5-per-60s";r=4;t=12'
        if outage == "stopped":
            proxy.stop()
        else:
            proxy.hanging = True
        for attempt in (1, 2, 3):
            started = time.perf_counter()
            response = await request(allow)
            assert timed(started) < TIMEOUT + SLACK
            assert response.status == 200 and "ratelimit" not in response.headers
            assert allow.backend_errors == attempt
        started = time.perf_counter()
        assert (await request(deny)).status == 503
        assert timed(started) < TIMEOUT + SLACK

        if outage == "stopped":
            proxy.start()
        else:
            proxy.hanging = False
        back = await until_decided(allow)
        # The same state as before the outage: nothing was counted, or counted twice, meanwhile.
        assert back.headers["ratelimit"] == '"5-per-60s";r=3;t=24'
        assert (await request(deny)).headers["ratelimit"] == '"5-per-60s";r=2;t=36'
    finally:
        await backend.aclose()
