"""RedisBackend's connections: login, databases, TLS, unix sockets, settings read from redis-py
clients, bad URLs, a server answering nonsense, and our own busy event loop."""

from __future__ import annotations

import asyncio
import gc
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as redis_asyncio
from redis.credentials import UsernamePasswordCredentialProvider

from asgi_resilience.ratelimit import BackendError, parse_rates, strategy_for
from asgi_resilience.ratelimit.pipe import Address, Pipe, pack
from asgi_resilience.ratelimit.redis import RedisBackend
from tests.redis_servers import RedisServer, free_port, redis_cluster
from tests.test_ratelimit_redis_topologies import _owns

pytestmark = [pytest.mark.redis, pytest.mark.anyio]
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio: asyncio only
__all__ = ["redis_cluster"]  # a fixture
GCRA, RATES = strategy_for("gcra"), parse_rates("5/day")


async def remaining_after_one(backend: RedisBackend, key: str = "client") -> int:
    try:
        return (await backend.decide(GCRA, key, RATES, 1)).statuses[0].remaining
    finally:
        await backend.aclose()


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, "--requirepass", "s3cret", "--unixsocket", "redis.sock")
    server.start(wait=False)
    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis(port=server.port, password="s3cret") as client:
                client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
    yield server
    server.stop()


@ASYNCIO_ONLY
async def test_password_database_and_unix_socket(locked_redis: RedisServer) -> None:
    port = locked_redis.port
    assert (
        await remaining_after_one(RedisBackend.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")) == 4
    )
    url = f"redis://default:s3cret@127.0.0.1:{port}/3"
    assert await remaining_after_one(RedisBackend.from_url(url)) == 3  # same db, same key
    socket_path = locked_redis.folder / "redis.sock"
    unix = f"unix://:s3cret@{socket_path}?db=3"
    assert await remaining_after_one(RedisBackend.from_url(unix)) == 2
    with redis.Redis(port=port, password="s3cret", db=3) as client:
        assert client.dbsize() == 1
    with redis.Redis(port=port, password="s3cret", db=0) as client:
        assert client.dbsize() == 0
    client_settings = redis_asyncio.Redis(port=port, password="s3cret", db=3)
    assert await remaining_after_one(RedisBackend(client_settings)) == 1


@ASYNCIO_ONLY
async def test_a_wrong_password_fails_the_ping_clearly(locked_redis: RedisServer) -> None:
    backend = RedisBackend.from_url(f"redis://:wrong@127.0.0.1:{locked_redis.port}/0")
    with pytest.raises(BackendError, match="refused the connection setup: WRONGPASS"):
        await backend.ping()
    await backend.aclose()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = RedisServer(
        tmp_path,
        *("--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"),
        port=free_port(),
    )
    server.start()  # waits on the plain port
    yield server, port
    server.stop()


@ASYNCIO_ONLY
async def test_tls_verifies_the_server(tls_redis: tuple[RedisServer, int]) -> None:
    server, tls_port = tls_redis
    cert = server.folder.parent / "cert.pem"
    verified = RedisBackend.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}")
    assert await remaining_after_one(verified) == 4
    unverified = RedisBackend.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none")
    assert await remaining_after_one(unverified) == 3
    untrusted = RedisBackend.from_url(f"rediss://127.0.0.1:{tls_port}/0")
    with pytest.raises(BackendError, match=r"Redis is not reachable: .*CERTIFICATE_VERIFY_FAILED"):
        await untrusted.ping()
    await untrusted.aclose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memcached://cache", "unknown Redis URL scheme"),
        ("redis+cluster://", "no host in the Redis URL"),
        ("redis+cluster://cache:port", "invalid port"),
        ("redis+sentinel://sentinel:26379", "invalid Sentinel URL"),
        ("redis+sentinel://sentinel:26379/mymaster/x", "invalid Sentinel URL"),
    ],
)
def test_bad_urls_are_refused_with_the_expected_form(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisBackend.from_url(url)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        RedisBackend(timeout=0)
    provider = UsernamePasswordCredentialProvider("user", "password")
    with pytest.raises(ValueError, match="cannot use a credential_provider"):
        RedisBackend(redis_asyncio.Redis(credential_provider=provider))
    with pytest.raises(ValueError, match="ssl_cert_reqs must be"):
        RedisBackend.from_url("rediss://cache:6379/0?ssl_cert_reqs=sometimes")


@ASYNCIO_ONLY
async def test_a_server_answering_nonsense_is_a_backend_error() -> None:
    async def nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"?not RESP\r\n")
        await writer.drain()
        await reader.read()  # until we are hung up on
        writer.close()

    server = await asyncio.start_server(nonsense, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(BackendError, match="invalid reply"):
            await backend.decide(GCRA, "client", RATES, 1)
        assert backend.connections == []  # hung up on, not kept out of step
    finally:
        await backend.aclose()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "anyio_backend",
    [
        pytest.param(("asyncio", {}), id="asyncio"),
        # uvloop (uvicorn's loop when installed) runs due timers before it polls for I/O.
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ],
)
async def test_our_own_busy_event_loop_is_never_taken_for_a_silent_redis(
    redis_url: str, redis_prefix: str
) -> None:
    """The loop is blocked for four timeouts while Redis' answer waits unread: no failure."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    loop = asyncio.get_running_loop()
    try:
        await backend.decide(GCRA, "warm-up", RATES, 1)
        for _ in range(3):
            decision = asyncio.ensure_future(backend.decide(GCRA, "client", RATES, 1))
            await asyncio.sleep(0)  # the decision is queued; its write goes out next turn
            loop.call_soon(time.sleep, 4 * backend.timeout)  # then the loop stops polling
            assert (await decision).allowed
    finally:
        await backend.aclose()


@ASYNCIO_ONLY
async def test_an_ask_redirect_during_a_slot_migration_is_followed(
    redis_cluster: list[RedisServer],
) -> None:
    backend = RedisBackend.from_url(f"redis+cluster://127.0.0.1:{redis_cluster[0].port}")
    try:
        await backend.ping()
        key = backend.key_for(GCRA, "migrating", RATES)
        with redis_cluster[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        owner = next(node for node in redis_cluster if _owns(node, slot))
        target = next(node for node in redis_cluster if node is not owner)
        ids = {}
        for node in (owner, target):
            with node.client() as client:
                ids[node.port] = client.execute_command("CLUSTER", "MYID").decode()
        with target.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[owner.port])
        with owner.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port])
        # The key is not on the owner: it answers ASK, and the decision is made on the target.
        decision = await backend.decide(GCRA, "migrating", RATES, 1)
        assert decision.statuses[0].remaining == 4
        with target.client() as client:
            client.execute_command("ASKING")
            assert client.exists(key) == 1
    finally:
        await backend.aclose()


class SocketOnlyTransport:
    """A transport that writes nowhere, over a socket nobody reads: what a busy loop leaves."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


@ASYNCIO_ONLY
@pytest.mark.parametrize("answered", [True, False])
async def test_the_stall_timer_asks_the_socket_before_failing(answered: bool) -> None:
    ours, theirs = socket.socketpair()
    try:
        pipe = Pipe(Address(), asyncio.get_running_loop())
        pipe.connection_made(SocketOnlyTransport(ours))  # type: ignore[arg-type]
        reply = pipe.call(pack(b"PING"), 0.02)
        second = pipe.call(pack(b"PING"), 0.02)
        if answered:  # Redis' answer is there, unread: the loop has not polled yet
            theirs.sendall(b"+PONG\r\n")
        await asyncio.sleep(0.05)  # the timer fires meanwhile
        assert reply.done() is not answered
        assert (pipe.stalled_at is None) is answered
        if answered:
            theirs.sendall(b"+PONG\r\n")
            await asyncio.sleep(0.01)
            pipe.data_received(ours.recv(64))  # the loop gets to it
            assert reply.result() == second.result() == b"PONG"
        else:
            with pytest.raises(BackendError, match="did not answer within 20 ms"):
                reply.result()
            assert reply.exception() is not second.exception()  # each caller its own error
            pipe.data_received(b"+PONG\r\n+PONG\r\n")  # late replies dropped, pipe usable
            assert pipe.usable
    finally:
        ours.close()
        theirs.close()


def test_a_backend_outlives_the_event_loop_it_first_ran_in(
    redis_url: str, redis_prefix: str
) -> None:
    """Two ``asyncio.run`` in turn (a reloaded server, a test runner): the second loop gets a
    connection of its own; the first loop's is dropped, never used across loops. (A transport
    of a closed loop cannot be closed through it: its socket is closed when it is collected,
    with asyncio's ResourceWarning, as for anything left open when a loop ends.)"""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)

    async def decide() -> int:
        return (await backend.decide(GCRA, "client", RATES, 1)).statuses[0].remaining

    async def decide_and_close() -> int:
        remaining = await decide()
        assert len(backend.connections) == 1
        await backend.aclose()
        assert backend.connections == []
        return remaining

    assert asyncio.run(decide()) == 4
    with warnings.catch_warnings(record=True) as dropped:
        warnings.simplefilter("always")
        assert asyncio.run(decide_and_close()) == 3
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in dropped)


@ASYNCIO_ONLY
async def test_a_connection_closed_by_a_healthy_redis_costs_no_decision(
    redis_url: str, redis_prefix: str
) -> None:
    """An idle timeout, a proxy or ``CLIENT KILL`` closes our connection: the next decisions
    wait for the new one instead of failing."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    try:
        assert (await backend.decide(GCRA, "client", RATES, 1)).allowed
        with redis.Redis.from_url(redis_url) as client:
            ours = [c for c in client.client_list() if c["cmd"] in ("evalsha", "eval")]
            for connection in ours:
                client.client_kill_filter(_id=connection["id"])
        await asyncio.sleep(0.05)  # the close reaches us
        decisions = [await backend.decide(GCRA, "client", RATES, 1) for _ in range(3)]
        assert [d.statuses[0].remaining for d in decisions] == [3, 2, 1]
    finally:
        await backend.aclose()


@ASYNCIO_ONLY
async def test_closing_during_the_first_connection_is_a_backend_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers, until we hang up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0")
    try:
        deciding = asyncio.ensure_future(backend.decide(GCRA, "client", RATES, 1))
        await asyncio.sleep(0.01)
        await backend.aclose()
        with pytest.raises(BackendError, match="closed"):
            await deciding  # not a CancelledError, which would escape the middleware
        await asyncio.sleep(0.05)  # our hang-up reaches the server
    finally:
        server.close()
        await server.wait_closed()


@ASYNCIO_ONLY
async def test_repeated_failures_raise_fresh_errors() -> None:
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens
    errors = []
    for _ in range(3):
        with pytest.raises(BackendError) as raised:
            await backend.decide(GCRA, "client", RATES, 1)
        errors.append(raised.value)
    await backend.aclose()
    assert len({id(error) for error in errors}) == 3  # none re-raised with a growing traceback
    assert all("127.0.0.1" in str(error) for error in errors)


def test_a_prefix_with_braces_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix must not contain"):
        RedisBackend(prefix="app:{rl}:")
