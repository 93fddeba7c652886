from __future__ import annotations

import socket
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any
from uuid import uuid4

import anyio
import anyio.to_thread
import pytest
from anyio.abc import SocketStream, TaskGroup, TaskStatus
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from asgi_resilience import Lifespan, StartupError, resilient
from asgi_resilience.sqlalchemy import _ENGINES, Database, DatabaseUnavailable
from tests.asgi import call, client_for, http_scope

pytestmark = pytest.mark.anyio

# aiosqlite and asyncpg run on asyncio only: SQLAlchemy's asyncio extension drives them through
# asyncio's event loop. Sync drivers run in worker threads, so they also run on trio.
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])
SQLITE_DRIVERS = pytest.mark.parametrize(
    ("anyio_backend", "driver"),
    [("asyncio", "sqlite+aiosqlite"), ("asyncio", "sqlite"), ("trio", "sqlite")],
    ids=["aiosqlite", "sqlite-asyncio", "sqlite-trio"],
)
CREATE_ITEMS = "CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(50) NOT NULL)"


@pytest.fixture
async def sqlite_db(
    anyio_backend: str, driver: str, tmp_path: Path
) -> AsyncIterator[Database[Any]]:
    db = Database(f"{driver}:///{tmp_path / 'app.db'}")
    yield db
    await db.dispose()


async def execute(session: AsyncSession | Session, sql: str, **params: Any) -> None:
    """Run ``sql`` in the session the way its engine allows: awaited, or in a worker thread."""
    if isinstance(session, AsyncSession):
        await session.execute(text(sql), params)
    else:
        await anyio.to_thread.run_sync(lambda: session.execute(text(sql), params))


def sqlite_names(db: Database[Any]) -> list[str]:
    """The rows of ``items`` as a fresh connection, outside the pool, sees them."""
    with closing(sqlite3.connect(str(db.url.database))) as connection:
        return [name for (name,) in connection.execute("SELECT name FROM items ORDER BY id")]


def sync_engine_of(db: Database[Any]) -> Any:
    engine = db.engine
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


# -- SQLite, always -------------------------------------------------------------------------


@SQLITE_DRIVERS
async def test_check_returns_latency_and_pool_status_counts(sqlite_db: Database[Any]) -> None:
    expected_pool = "AsyncAdaptedQueuePool" if sqlite_db.is_async else "QueuePool"
    before = sqlite_db.pool_status()
    assert before["pool"] is None and before["checked_out"] is None  # no engine yet
    latency = await sqlite_db.check()
    assert 0 < latency < 5
    status = sqlite_db.pool_status()
    assert status == {
        "url": str(sqlite_db.url),
        "pool": expected_pool,
        "size": 5,
        "checked_in": 1,
        "checked_out": 0,
        "overflow": 0,
    }
    async with sqlite_db.session() as session:
        await execute(session, "SELECT 1")
        assert sqlite_db.pool_status()["checked_out"] == 1
    assert sqlite_db.pool_status()["checked_out"] == 0


async def test_pools_without_counters_report_none(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'app.db'}", engine_options={"poolclass": NullPool})
    await db.check()
    assert db.pool_status() == {
        "url": str(db.url),
        "pool": "NullPool",
        "size": None,
        "checked_in": None,
        "checked_out": None,
        "overflow": None,
    }
    await db.dispose()


async def test_one_engine_per_url_and_options_until_disposed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    first, second = Database(url), Database(url, name="replica")
    other_options = Database(url, engine_options={"pool_size": 2})
    assert first.engine is second.engine
    assert other_options.engine is not first.engine
    assert first.pool_status()["size"] == 5 and other_options.pool_status()["size"] == 2
    disposed = first.engine
    await first.dispose()
    assert first.engine is not disposed  # a fresh engine, registered again
    assert Database(url).engine is first.engine
    await second.dispose()  # its engine is no longer the registered one: nothing to forget
    assert Database(url).engine is first.engine
    for db in (first, other_options):
        await db.dispose()
    assert not any(key[0] == url for key in _ENGINES)


async def test_a_given_engine_is_used_as_is_and_disposed(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    closed: list[object] = []
    event.listen(engine, "close", lambda *args: closed.append(args))
    db = Database(engine, name="given")
    assert db.engine is engine and not db.is_async and db.url == engine.url
    await db.check()
    await db.dispose()
    assert len(closed) == 1
    assert db.engine is engine  # still usable: SQLAlchemy reopens connections on demand
    assert repr(db) == f"Database('given', url={str(engine.url)!r})"
    with pytest.raises(ValueError, match="engine_options apply to a URL"):
        Database(engine, engine_options={"echo": True})  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"connect_attempts": 0}, "connect_attempts must be a whole number >= 1"),
        ({"connect_attempts": 3.0}, "connect_attempts must be a whole number >= 1"),
        ({"check_timeout": 0}, "check_timeout must be a number of seconds > 0"),
        ({"check_timeout": float("inf")}, "check_timeout must be a number of seconds > 0"),
        ({"dispose_timeout": -1}, "dispose_timeout must be a number of seconds > 0"),
        ({"critical": 1}, "critical must be True or False"),
        ({"name": ""}, "name must be a non-empty string"),
    ],
)
def test_options_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Database("sqlite://", **options)


def test_install_registers_all_or_nothing() -> None:
    lifespan = Lifespan()
    lifespan.add_status("database", dict)  # the name taken by another section
    with pytest.raises(ValueError, match="'database' is already registered with this lifespan"):
        Database("sqlite://").install(lifespan)
    assert not lifespan.checks and not lifespan.resource_names  # nothing half installed
    Database("sqlite://", name="orders").install(lifespan)
    assert list(lifespan.checks) == ["orders"] and lifespan.resource_names == ["orders"]
    assert lifespan.status_names == ["database", "orders"]


@SQLITE_DRIVERS
async def test_install_checks_at_startup_and_disposes_at_shutdown(
    sqlite_db: Database[Any],
) -> None:
    lifespan = Lifespan()
    sqlite_db.install(lifespan)
    assert lifespan.checks["database"].attempts == sqlite_db.connect_attempts
    opened: list[object] = []
    closed: list[object] = []
    event.listen(sync_engine_of(sqlite_db), "connect", lambda *args: opened.append(args))
    event.listen(sync_engine_of(sqlite_db), "close", lambda *args: closed.append(args))
    await lifespan.startup()
    assert lifespan.startup_results["database"].ok
    status = await lifespan.status()
    assert status["database"]["checked_in"] == 1
    assert status["resources"] == ["database"]
    report = await lifespan.shutdown()
    assert [(r.name, r.outcome) for r in report] == [("database", "ok")]
    assert len(opened) == len(closed) == 1  # the pooled connection was closed
    assert sqlite_db.pool_status()["pool"] is None  # engine forgotten, not re-created


@SQLITE_DRIVERS
async def test_transaction_commits_on_success_and_rolls_back_on_error(
    sqlite_db: Database[Any],
) -> None:
    async with sqlite_db.transaction() as session:
        await execute(session, CREATE_ITEMS.format(table="items"))
        await execute(session, "INSERT INTO items (name) VALUES (:name)", name="anvil")
    assert sqlite_names(sqlite_db) == ["anvil"]
    with pytest.raises(RuntimeError, match="boom"):
        async with sqlite_db.transaction() as session:
            await execute(session, "INSERT INTO items (name) VALUES (:name)", name="magnet")
            raise RuntimeError("boom")
    assert sqlite_names(sqlite_db) == ["anvil"]
    assert sqlite_db.pool_status()["checked_out"] == 0


@SQLITE_DRIVERS
async def test_session_commits_only_when_asked(sqlite_db: Database[Any]) -> None:
    async with sqlite_db.transaction() as session:
        await execute(session, CREATE_ITEMS.format(table="items"))
    async with sqlite_db.session() as session:
        await execute(session, "INSERT INTO items (name) VALUES ('draft')")
    assert sqlite_names(sqlite_db) == []
    async with sqlite_db.session() as session:
        await execute(session, "INSERT INTO items (name) VALUES ('kept')")
        if isinstance(session, AsyncSession):
            await session.commit()
        else:
            await anyio.to_thread.run_sync(session.commit)
    assert sqlite_names(sqlite_db) == ["kept"]


@SQLITE_DRIVERS
async def test_fastapi_dependency_gives_each_request_a_session(sqlite_db: Database[Any]) -> None:
    async with sqlite_db.transaction() as session:
        await execute(session, CREATE_ITEMS.format(table="items"))
        await execute(session, "INSERT INTO items (name) VALUES ('anvil'), ('rocket')")
    app = FastAPI()
    if sqlite_db.is_async:

        @app.get("/count")
        async def count(session: AsyncSession = Depends(sqlite_db.dependency)) -> int:
            return int((await session.execute(text("SELECT count(*) FROM items"))).scalar_one())

    else:  # sync engines: a sync handler, which FastAPI runs in its thread pool

        @app.get("/count")
        def count_sync(session: Session = Depends(sqlite_db.dependency)) -> int:
            return int(session.execute(text("SELECT count(*) FROM items")).scalar_one())

    async with client_for(app) as client:
        response = await client.get("/count")
    assert response.status_code == 200
    assert response.json() == 2
    assert sqlite_db.pool_status()["checked_out"] == 0  # the session was closed


@SQLITE_DRIVERS
async def test_readiness_and_status_through_resilient(sqlite_db: Database[Any]) -> None:
    lifespan = Lifespan()
    sqlite_db.install(lifespan)
    app = resilient(FastAPI(), lifespan=lifespan, health_status_details=True, health_cache_ttl=0)
    async with LifespanManager(app) as manager, client_for(manager.app) as client:
        ready = await client.get("/health/ready")
        status = await client.get("/health/status")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"]["status"] == "up"
    assert status.status_code == 200
    pool = status.json()["database"]
    assert pool["size"] == 5 and pool["checked_in"] == 1 and pool["checked_out"] == 0
    assert [(r.name, r.outcome) for r in lifespan.shutdown_report] == [("database", "ok")]


async def test_errors_name_the_driver_error_and_non_critical_checks_only_degrade(
    tmp_path: Path,
) -> None:
    db = Database(
        f"sqlite:///{tmp_path / 'missing' / 'app.db'}", critical=False, connect_attempts=1
    )
    with pytest.raises(DatabaseUnavailable) as unavailable:
        await db.check()
    assert str(unavailable.value) == "OperationalError: unable to open database file"
    lifespan = Lifespan()
    db.install(lifespan)
    await lifespan.startup()  # degraded, not failed
    assert lifespan.state == "ready"
    assert lifespan.startup_results["database"].error == (
        "DatabaseUnavailable: OperationalError: unable to open database file"
    )
    assert not lifespan.startup_results["database"].critical
    await lifespan.shutdown()


async def test_an_exhausted_pool_fails_the_check(tmp_path: Path) -> None:
    options = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.05}
    db = Database(f"sqlite:///{tmp_path / 'app.db'}", engine_options=options)
    async with db.session() as session:
        await execute(session, "SELECT 1")  # holds the only connection
        with pytest.raises(DatabaseUnavailable, match="QueuePool limit of size 1 overflow 0"):
            await db.check()
    await db.check()
    await db.dispose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_async_driver_on_trio_says_it_needs_asyncio(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    with pytest.raises(RuntimeError, match="needs asyncio"):
        await db.check()
    await db.dispose()


@ASYNCIO_ONLY
async def test_startup_fails_naming_the_check_without_the_password(closed_port: int) -> None:
    db = Database(
        f"postgresql+asyncpg://postgres:s3cret@127.0.0.1:{closed_port}/test",
        name="orders-db",
        connect_attempts=2,
    )
    lifespan = Lifespan()
    db.install(lifespan)
    with pytest.raises(StartupError, match="check 'orders-db' failed") as raised:
        await lifespan.startup()
    message = str(raised.value)
    assert "DatabaseUnavailable" in message and "Connect call failed" in message
    assert "s3cret" not in message
    assert raised.value.failures[0].attempts == 2
    with pytest.raises(DatabaseUnavailable) as unavailable:
        await db.check()
    assert "s3cret" not in str(unavailable.value)
    assert "s3cret" not in repr(db) and "***" in db.pool_status()["url"]
    await db.dispose()


# -- PostgreSQL -----------------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the PostgreSQL server and can be stopped and restarted on
    the same port: a database outage as the application sees it, without touching the server
    (other tests share it). ``reserve=True``: the port is taken at once, and refuses
    connections until ``start`` listens on it (a database that is not up yet)."""

    def __init__(self, target: URL, *, reserve: bool = False) -> None:
        self.target = (target.host or "127.0.0.1", target.port or 5432)
        self.port = 0
        self._reserved: socket.socket | None = None
        if reserve:
            self._reserved = socket.socket()
            self._reserved.bind(("127.0.0.1", 0))
            self.port = self._reserved.getsockname()[1]
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()

    async def start(self, group: TaskGroup) -> None:
        self._stopped = anyio.Event()
        await group.start(self._serve)

    async def stop(self) -> None:
        """Close the listener and every forwarded connection."""
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()

    async def _serve(self, *, task_status: TaskStatus[None]) -> None:
        listener: anyio.abc.Listener[SocketStream]
        if self._reserved is not None:
            reserved, self._reserved = self._reserved, None
            reserved.listen()
            listener = await anyio.abc.SocketListener.from_socket(reserved)
        else:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        try:
            with anyio.CancelScope() as self._scope:
                async with listener, anyio.create_task_group() as connections:
                    task_status.started()
                    await listener.serve(self._forward, connections)
        finally:
            self._stopped.set()

    async def _forward(self, client: SocketStream) -> None:
        async with client:
            try:
                upstream = await anyio.connect_tcp(*self.target)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as pumps:
                pumps.start_soon(_pump, client, upstream, pumps.cancel_scope)
                pumps.start_soon(_pump, upstream, client, pumps.cancel_scope)


async def _pump(source: SocketStream, sink: SocketStream, both: anyio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    finally:
        both.cancel()  # one side is gone: drop the other too


@pytest.fixture
def asyncpg_url(database_url: str) -> URL:
    return make_url(database_url).set(drivername="postgresql+asyncpg")


async def count_rows(url: URL, table: str) -> int:
    """Count through a connection of its own (no pool), as another client would."""
    verify = Database(url, name="verify", engine_options={"poolclass": NullPool})
    try:
        async with verify.session() as session:
            return int((await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())
    finally:
        await verify.dispose()


@ASYNCIO_ONLY
@pytest.mark.postgres
async def test_postgres_check_pool_and_transactions(asyncpg_url: URL) -> None:
    db: Database[AsyncSession] = Database(asyncpg_url, engine_options={"pool_size": 3})
    table = f"asgi_resilience_{uuid4().hex[:12]}"
    try:
        assert 0 < await db.check() < 5
        assert db.pool_status()["pool"] == "AsyncAdaptedQueuePool"
        assert db.pool_status()["size"] == 3 and db.pool_status()["checked_in"] == 1
        async with db.transaction() as session:
            await session.execute(text(f"CREATE TABLE {table} (name VARCHAR(50) NOT NULL)"))
            await session.execute(text(f"INSERT INTO {table} (name) VALUES ('anvil')"))
        with pytest.raises(RuntimeError, match="boom"):
            async with db.transaction() as session:
                await session.execute(text(f"INSERT INTO {table} (name) VALUES ('magnet')"))
                assert db.pool_status()["checked_out"] == 1
                raise RuntimeError("boom")
        assert await count_rows(asyncpg_url, table) == 1
    finally:
        async with db.transaction() as session:
            await session.execute(text(f"DROP TABLE IF EXISTS {table}"))
        await db.dispose()


@ASYNCIO_ONLY
@pytest.mark.postgres
async def test_postgres_outage_fails_readiness_until_the_database_returns(
    asyncpg_url: URL,
) -> None:
    proxy = TcpProxy(asyncpg_url)
    async with anyio.create_task_group() as group:
        await proxy.start(group)
        db = Database(asyncpg_url.set(host="127.0.0.1", port=proxy.port), check_timeout=2)
        lifespan = Lifespan()
        db.install(lifespan)
        app = resilient(FastAPI(), lifespan=lifespan, health_cache_ttl=0)
        async with LifespanManager(app) as manager, client_for(manager.app) as client:
            assert (await client.get("/health/ready")).status_code == 200
            await proxy.stop()
            down = await client.get("/health/ready")
            await proxy.start(group)
            up = await client.get("/health/ready")
        await proxy.stop()
    assert down.status_code == 503
    check = down.json()["checks"]["database"]
    assert check["status"] == "down" and "DatabaseUnavailable" in check["error"]
    assert up.status_code == 200
    assert up.json()["checks"]["database"]["status"] == "up"
    assert [(r.name, r.outcome) for r in lifespan.shutdown_report] == [("database", "ok")]


@ASYNCIO_ONLY
@pytest.mark.postgres
async def test_postgres_startup_retries_while_the_database_comes_up(asyncpg_url: URL) -> None:
    proxy = TcpProxy(asyncpg_url, reserve=True)
    db = Database(asyncpg_url.set(host="127.0.0.1", port=proxy.port), connect_attempts=6)
    lifespan = Lifespan()
    db.install(lifespan)

    async def start_later(group: TaskGroup) -> None:
        await anyio.sleep(0.05)  # the first attempt finds it down; a retry finds it up
        await proxy.start(group)

    async with anyio.create_task_group() as group:
        group.start_soon(start_later, group)
        await lifespan.startup()
        await lifespan.shutdown()
        await proxy.stop()
    result = lifespan.startup_results["database"]
    assert result.ok and result.attempts > 1


@pytest.mark.anyio
async def test_a_blocked_sync_check_does_not_start_a_thread_per_probe() -> None:
    import sqlite3
    import threading

    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    release = threading.Event()

    def connect() -> sqlite3.Connection:
        release.wait(5)
        return sqlite3.connect(":memory:")

    engine = create_engine("sqlite://", creator=connect, poolclass=NullPool)
    db = Database(engine, name="hung")
    try:
        with anyio.move_on_after(0.1):
            await db.check()  # abandoned in its daemon thread
        before = threading.active_count()
        for _ in range(10):
            with pytest.raises(DatabaseUnavailable, match="still blocked"):
                await db.check()
        assert threading.active_count() == before
    finally:
        release.set()
    with anyio.fail_after(5):
        while True:  # the abandoned thread returns now: checks run again
            try:
                assert await db.check() >= 0
                break
            except DatabaseUnavailable as exc:
                assert "still blocked" in str(exc)
                await anyio.sleep(0.01)  # a thread: no event to wait on
    engine.dispose()


@ASYNCIO_ONLY
@pytest.mark.postgres
async def test_a_request_deadline_becomes_each_transactions_statement_timeout(
    asyncpg_url: URL,
) -> None:
    from asgi_resilience.overload import TimeoutMiddleware

    db: Database[AsyncSession] = Database(asyncpg_url, name="deadline")
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            async with db.transaction() as session:
                show = text("SHOW statement_timeout")
                seen["inside"] = (await session.execute(show)).scalar_one()
                await session.execute(text("SELECT pg_sleep(5)"))
        except Exception as exc:  # cancelled by PostgreSQL, before our own deadline
            seen["error"] = str(exc)
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    try:
        response = await call(TimeoutMiddleware(app, timeout=2.0), http_scope())
        async with db.session() as session:  # outside a request: the server's own setting
            seen["outside"] = (await session.execute(text("SHOW statement_timeout"))).scalar_one()
    finally:
        await db.dispose()
    milliseconds = int(seen["inside"].removesuffix("ms")) if seen["inside"].endswith("ms") else 0
    if seen["inside"].endswith("s") and not seen["inside"].endswith("ms"):
        milliseconds = int(float(seen["inside"][:-1]) * 1000)
    assert 1000 < milliseconds <= 2000, seen
    assert "statement timeout" in seen.get("error", ""), seen
    assert response.status == 503  # the app's answer: PostgreSQL ended the statement in time
    assert seen["outside"] == "0"  # SET LOCAL ended with the transaction
