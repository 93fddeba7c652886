"""A SQLAlchemy engine as a managed resource (extra ``sqlalchemy``).

``Database`` gives the lifespan a startup check (``SELECT 1``, retried while the database comes
up), a readiness check, pool statistics for ``/health/status`` and ``engine.dispose()`` at
shutdown; handlers get ``session()``, ``transaction()`` and a FastAPI dependency::

    db = Database("postgresql+asyncpg://app:secret@db/app")
    lifespan = Lifespan()
    db.install(lifespan)
    app = resilient(api, lifespan=lifespan)

    @api.post("/items")
    async def create(item: Item, session: AsyncSession = Depends(db.dependency)) -> ...: ...

One engine per URL: engines made from a URL live in a process-wide registry keyed by the URL
(password included) and the engine options, so ``Database(url)`` built twice (an app factory
called twice) shares one pool. ``dispose()`` closes the pool and removes the engine from the
registry; the next use makes a fresh one, so each event loop (each test) gets its own pool. A
``Database`` still holding the disposed engine keeps working: SQLAlchemy reopens connections.

Async drivers (``sqlite+aiosqlite``, ``postgresql+asyncpg``) make an ``AsyncEngine`` and need
asyncio. Sync drivers (``sqlite``, ``postgresql+psycopg2``) make an ``Engine`` that works on
asyncio and trio: its blocking calls (check, dispose, commit, rollback, close) run in a worker
thread. The ``Session`` it yields is a plain one: run your queries in a thread too, or use sync
(``def``) FastAPI handlers, which FastAPI runs in its thread pool.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any, Generic, TypeVar, cast, overload

import anyio
import anyio.to_thread

from ._extras import missing_extra

try:
    from sqlalchemy import Engine, create_engine, event, make_url, text
    from sqlalchemy.engine import URL
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import QueuePool
except ModuleNotFoundError as exc:  # tested in a subprocess without it
    missing_extra(exc, "sqlalchemy", "asgi_resilience.sqlalchemy", ("sqlalchemy",))

from ._checks import check_bool, check_count, check_name, check_seconds
from .calls import describe_error, in_daemon_thread
from .context import remaining_time
from .exceptions import DatabaseUnavailable as DatabaseUnavailable
from .lifespan import Lifespan

__all__ = ["Database", "DatabaseUnavailable"]

SessionT = TypeVar("SessionT", AsyncSession, Session)
_SELECT_1 = text("SELECT 1")
_ENGINES: dict[tuple[str, str], Engine | AsyncEngine] = {}
_ENGINES_LOCK = threading.Lock()


class Database(Generic[SessionT]):
    """One database: its engine, checks, pool statistics, sessions and transactions.

    The engine is created on first use, not here; given a URL, ``pool_pre_ping=True`` is on
    unless ``engine_options`` says otherwise, so connections the server dropped (a restart, a
    failover) are replaced instead of failing a request. Error text never shows the password.

    Typed by the session it yields: ``Database(async_engine)`` is a ``Database[AsyncSession]``,
    ``Database(engine)`` a ``Database[Session]``; from a URL, say which you expect
    (``db: Database[AsyncSession] = Database(url)``).

    Args:
        url_or_engine: a database URL, or an ``Engine``/``AsyncEngine`` you created (it is
            used as is and disposed at shutdown).
        name: the name of the check, the shutdown resource and the ``/health/status`` section.
        connect_attempts: startup tries before giving up, with exponential backoff between
            them (0.1 s doubling, at most 2 s: 10 attempts wait about 11 s in all).
        check_timeout: seconds for one ``SELECT 1``.
        dispose_timeout: seconds for closing the pool at shutdown.
        critical: a failing check fails startup and readiness; otherwise it is only reported.
        engine_options: keyword arguments for ``create_engine``/``create_async_engine``
            (``pool_size``, ``connect_args``...); only with a URL.

    Attributes:
        url: the ``sqlalchemy.engine.URL`` (``url.render_as_string()`` masks the password).
        is_async: the engine is an ``AsyncEngine``.
    """

    @overload
    def __init__(
        self: Database[AsyncSession],
        url_or_engine: AsyncEngine,
        *,
        name: str = ...,
        connect_attempts: int = ...,
        check_timeout: float = ...,
        dispose_timeout: float = ...,
        critical: bool = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: Database[Session],
        url_or_engine: Engine,
        *,
        name: str = ...,
        connect_attempts: int = ...,
        check_timeout: float = ...,
        dispose_timeout: float = ...,
        critical: bool = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: Database[Any],
        url_or_engine: str | URL,
        *,
        name: str = ...,
        connect_attempts: int = ...,
        check_timeout: float = ...,
        dispose_timeout: float = ...,
        critical: bool = ...,
        engine_options: Mapping[str, Any] | None = ...,
    ) -> None: ...

    def __init__(
        self,
        url_or_engine: str | URL | Engine | AsyncEngine,
        *,
        name: str = "database",
        connect_attempts: int = 10,
        check_timeout: float = 5.0,
        dispose_timeout: float = 5.0,
        critical: bool = True,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_name("name", name)
        check_count("connect_attempts", connect_attempts, minimum=1)
        check_seconds("check_timeout", check_timeout)
        check_seconds("dispose_timeout", dispose_timeout)
        check_bool("critical", critical)
        self.name = name
        self.connect_attempts = connect_attempts
        self.check_timeout = check_timeout
        self.dispose_timeout = dispose_timeout
        self.critical = critical
        self._key: tuple[str, str] | None = None
        self._engine: Engine | AsyncEngine | None = None
        self._blocked_check = False  # a sync check's thread has not returned yet
        if isinstance(url_or_engine, (Engine, AsyncEngine)):
            if engine_options:
                raise ValueError("engine_options apply to a URL; configure your engine yourself")
            self._engine = url_or_engine
            self.url = url_or_engine.url
            self.is_async = isinstance(url_or_engine, AsyncEngine)
            self.engine_options: dict[str, Any] = {}
        else:
            self.url = make_url(url_or_engine)
            self.is_async = bool(self.url.get_dialect().is_async)
            self.engine_options = {"pool_pre_ping": True, **(engine_options or {})}
            options = repr(sorted(self.engine_options.items()))
            self._key = (self.url.render_as_string(hide_password=False), options)

    def __repr__(self) -> str:
        return f"Database({self.name!r}, url={self.url.render_as_string()!r})"

    @property
    def engine(self) -> Engine | AsyncEngine:
        """The engine, created on first use and shared by every ``Database`` of the same URL
        and engine options until it is disposed."""
        if self._engine is None:
            assert self._key is not None  # only engines made from a URL are ever forgotten
            with _ENGINES_LOCK:
                engine = _ENGINES.get(self._key)
                if engine is None:
                    create = create_async_engine if self.is_async else create_engine
                    engine = _ENGINES[self._key] = create(self.url, **self.engine_options)
            self._engine = engine
        return self._engine

    async def _check_in_thread(self, engine: Engine) -> None:
        # A daemon thread: a connect that hangs is abandoned at the check's timeout and must
        # not keep a failed process from exiting (anyio's workers would). One at a time: while
        # an abandoned one is still blocked, probes fail at once instead of piling up threads.
        if self._blocked_check:
            raise DatabaseUnavailable("an earlier check is still blocked connecting")
        self._blocked_check = True  # the thread clears it when it returns
        await in_daemon_thread(functools.partial(self._select_1_and_release, engine))

    def _select_1_and_release(self, engine: Engine) -> None:
        try:
            _select_1(engine)
        finally:
            self._blocked_check = False

    async def check(self) -> float:
        """Run ``SELECT 1`` on a pooled connection and return how long it took, in seconds.

        Raises:
            DatabaseUnavailable: the database could not be reached or answered with an error;
                the message names the driver's error, with the password masked.
        """
        began = perf_counter()
        engine = self._usable_engine()
        try:
            if isinstance(engine, AsyncEngine):
                async with engine.connect() as connection:
                    await connection.execute(_SELECT_1)
            else:
                await self._check_in_thread(engine)
        except Exception as exc:
            raise DatabaseUnavailable(self._describe(exc)) from exc
        return perf_counter() - began

    def pool_status(self) -> dict[str, Any]:
        """Pool statistics for ``/health/status``.

        Always the same keys: ``url`` (password masked), ``pool`` (the pool class, ``None``
        before the engine exists), ``size`` (``pool_size``), ``checked_in`` (idle in the pool),
        ``checked_out`` (in use) and ``overflow`` (open beyond ``size``). Pools that do not
        count them (``NullPool``, ``StaticPool``, ``SingletonThreadPool``) report ``None``.
        """
        status: dict[str, Any] = {"url": self.url.render_as_string(), "pool": None}
        status.update(dict.fromkeys(("size", "checked_in", "checked_out", "overflow")))
        engine = self._engine
        if engine is not None:
            pool = engine.sync_engine.pool if isinstance(engine, AsyncEngine) else engine.pool
            status["pool"] = type(pool).__name__
            if isinstance(pool, QueuePool):
                status["size"] = pool.size()
                status["checked_in"] = pool.checkedin()
                status["checked_out"] = pool.checkedout()
                status["overflow"] = max(0, pool.overflow())  # negative: slots not yet opened
        return status

    async def dispose(self) -> None:
        """Close the pool's connections; an engine made from a URL is also forgotten, so the
        next use creates a new one. Connections still checked out close when returned."""
        engine = self._engine
        if engine is None:
            return
        if self._key is not None:
            self._engine = None
            with _ENGINES_LOCK:
                if _ENGINES.get(self._key) is engine:
                    del _ENGINES[self._key]
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        else:
            await in_daemon_thread(engine.dispose)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[SessionT]:
        """A session for one unit of work, closed on exit (even when cancelled).

        An ``AsyncSession`` on an async engine, a ``Session`` on a sync one; both with
        ``expire_on_commit=False``, so objects stay readable after a commit without more I/O.
        Nothing is committed for you: call ``commit()`` or use ``transaction()``.

        Inside a request with a deadline (``TimeoutMiddleware``), every transaction of the
        session on PostgreSQL starts with ``SET LOCAL statement_timeout`` to the time left (less a
        margin: PostgreSQL ends the statement just before the deadline would), so
        a slow query ends with the request instead of running on after the client got its 504.
        """
        engine = self._usable_engine()
        if isinstance(engine, AsyncEngine):
            session: AsyncSession | Session = AsyncSession(engine, expire_on_commit=False)
        else:
            session = Session(engine, expire_on_commit=False)
        left = remaining_time()
        if left is not None and engine.dialect.name == "postgresql":
            _limit_statements(session, time.monotonic() + left)
        try:
            yield cast(SessionT, session)
        finally:
            with anyio.CancelScope(shield=True):
                await _apply(session, Session.close)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SessionT]:
        """A session whose work is committed when the block ends normally and rolled back
        when it raises (or is cancelled); the exception propagates."""
        async with self.session() as session:
            try:
                yield session
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await _apply(session, Session.rollback)
                raise
            await _apply(session, Session.commit)

    async def dependency(self) -> AsyncIterator[SessionT]:
        """A FastAPI dependency: ``session: AsyncSession = Depends(db.dependency)`` gets a
        session for the request, closed after it (see ``session()``)."""
        async with self.session() as session:
            yield session

    def install(self, lifespan: Lifespan) -> None:
        """Register with ``lifespan``: the check (startup with ``connect_attempts`` and
        readiness), ``dispose()`` as a shutdown resource and ``pool_status()`` as a
        ``/health/status`` section, all under ``name``: all three, or none when one of the
        names is taken already."""
        taken = self.name in lifespan.checks or self.name in lifespan.resource_names
        if taken or self.name in lifespan.status_names:
            raise ValueError(
                f"{self.name!r} is already registered with this lifespan: give this database "
                f"another name (Database(..., name=...))"
            )
        lifespan.add_check(
            self.name,
            self.check,
            timeout=self.check_timeout,
            critical=self.critical,
            attempts=self.connect_attempts,
        )
        lifespan.add_resource(self.name, self.dispose, timeout=self.dispose_timeout)
        lifespan.add_status(self.name, self.pool_status)

    def _usable_engine(self) -> Engine | AsyncEngine:
        engine = self.engine
        if isinstance(engine, AsyncEngine):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    f"{self!r} uses an async driver, which needs asyncio; on trio use a sync "
                    "driver (sqlite://, postgresql+psycopg2://), run in worker threads"
                ) from None
        return engine

    def _describe(self, exc: Exception) -> str:
        # SQLAlchemy's wrappers add the SQL and a link: describe the driver's own error.
        cause: BaseException = exc
        while type(cause).__module__.startswith("sqlalchemy."):
            inner = cause.orig if isinstance(cause, DBAPIError) else cause.__cause__
            if inner is None:
                break
            cause = inner
        description = describe_error(cause)
        password = self.url.password
        return description.replace(str(password), "***") if password else description


def _select_1(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(_SELECT_1)


async def _apply(session: AsyncSession | Session, action: Callable[[Session], object]) -> None:
    """Run a ``Session`` method without blocking: in SQLAlchemy's greenlet for an async
    session, in a worker thread for a sync one."""
    if isinstance(session, AsyncSession):
        await session.run_sync(action)
    else:
        await anyio.to_thread.run_sync(action, session)


def _limit_statements(session: AsyncSession | Session, deadline: float) -> None:
    """Make each transaction of ``session`` start with a ``statement_timeout`` of the time left
    before ``deadline`` (``time.monotonic()``), less a margin (a tenth, at most 100 ms);
    ``SET LOCAL`` ends with the transaction, so the pooled connection keeps its own setting."""
    sync_session = session.sync_session if isinstance(session, AsyncSession) else session

    def set_statement_timeout(session: Session, transaction: Any, connection: Any) -> None:
        left = deadline - time.monotonic()
        # A little before the deadline: PostgreSQL ends the statement first, so the app gets
        # the error (and the connection stays usable) instead of being cancelled mid-query.
        milliseconds = max(1, int((left - min(0.1, left / 10)) * 1000))
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {milliseconds}")

    event.listen(sync_session, "after_begin", set_statement_timeout)
