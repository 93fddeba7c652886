from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_resilience import HealthApp, Lifespan, resilient
from asgi_resilience.types import ASGIApp
from tests.asgi import Response, call, client_for, http_scope
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio


class Dependency:
    """A fake dependency: its check can be made to fail or hang, and counts its runs."""

    def __init__(self) -> None:
        self.calls = 0
        self.delay = 0.0
        self.hang = False
        self.error: Exception | None = None

    async def check(self) -> None:
        self.calls += 1
        if self.delay:
            await anyio.sleep(self.delay)
        if self.hang:
            await anyio.sleep_forever()
        if self.error is not None:
            raise self.error


@asynccontextmanager
async def started(lifespan: Lifespan) -> AsyncIterator[Lifespan]:
    await lifespan.startup()
    try:
        yield lifespan
    finally:
        await lifespan.shutdown()


def lifespan_with(database: Dependency, *, timeout: float = 1.0) -> Lifespan:
    lifespan = Lifespan()
    lifespan.add_check("database", database.check, timeout=timeout)
    return lifespan


async def get(app: ASGIApp, path: str, method: str = "GET") -> Response:
    return await call(app, http_scope(path, method=method))


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("home")


def user_app() -> Starlette:
    return Starlette(routes=[Route("/", home)])


# -- liveness and readiness ------------------------------------------------------------------


async def test_ready_when_started_and_checks_pass() -> None:
    database = Dependency()
    async with started(lifespan_with(database)) as lifespan:
        health = HealthApp(lifespan)
        ready = await get(health, "/health/ready")
        summary = await get(health, "/health")
    assert ready.status == 200
    body = ready.json()
    assert body["status"] == "ready"
    check = body["checks"]["database"]
    assert check["status"] == "up" and check["critical"] is True
    assert isinstance(check["duration_ms"], float) and check["duration_ms"] >= 0
    assert "error" not in check
    assert ready.headers["content-type"] == "application/json"
    assert summary.status == 200
    assert summary.json() == {"status": "ok", "live": True, "ready": True}


async def test_liveness_stays_up_while_a_dependency_is_down() -> None:
    database = Dependency()
    async with started(lifespan_with(database)) as lifespan:
        health = HealthApp(lifespan)
        database.error = ConnectionError("connection refused")
        runs = database.calls
        live = await get(health, "/health/live")
        assert database.calls == runs  # liveness touches no dependency
        ready = await get(health, "/health/ready")
        summary = await get(health, "/health")
    assert live.status == 200
    assert live.json() == {"status": "alive"}
    assert ready.status == 503
    body = ready.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["database"]["status"] == "down"
    assert body["checks"]["database"]["error"] == "ConnectionError: connection refused"
    assert summary.status == 503
    assert summary.json() == {"status": "unavailable", "live": True, "ready": False}


async def test_a_check_that_hangs_fails_readiness_within_its_timeout() -> None:
    database = Dependency()
    async with started(lifespan_with(database, timeout=0.1)) as lifespan:
        database.hang = True
        began = perf_counter()
        ready = await get(HealthApp(lifespan), "/health/ready")
        elapsed = perf_counter() - began
    assert ready.status == 503
    check = ready.json()["checks"]["database"]
    assert check["status"] == "down"
    assert "timed out" in check["error"]
    assert elapsed < 0.1 + 0.5


async def test_a_check_raising_timeout_error_is_not_reported_as_its_own_timeout() -> None:
    # A driver's own timeout (socket.timeout and asyncio.TimeoutError are TimeoutError) is the
    # check's failure: its message says what happened, not "timed out after <check timeout>".
    database = Dependency()
    async with started(lifespan_with(database, timeout=5)) as lifespan:
        database.error = TimeoutError("connect to db:5432 timed out after 0.5s")
        ready = await get(HealthApp(lifespan), "/health/ready")
    check = ready.json()["checks"]["database"]
    assert check["status"] == "down"
    assert check["duration_ms"] < 1000
    assert check["error"] == "TimeoutError: connect to db:5432 timed out after 0.5s"


async def test_non_critical_check_down_is_reported_but_keeps_readiness() -> None:
    database, search = Dependency(), Dependency()
    lifespan = lifespan_with(database)
    lifespan.add_check("search", search.check, critical=False)
    async with started(lifespan):
        search.error = ConnectionError("search unreachable")
        health = HealthApp(lifespan)
        ready = await get(health, "/health/ready")
        summary = await get(health, "/health")
    assert ready.status == 200
    checks = ready.json()["checks"]
    assert checks["database"]["status"] == "up"
    assert checks["search"] == {
        "status": "down",
        "critical": False,
        "duration_ms": checks["search"]["duration_ms"],
        "error": "ConnectionError: search unreachable",
    }
    assert summary.status == 200
    assert summary.json()["status"] == "degraded"


async def test_checks_without_readiness_are_not_rerun() -> None:
    database, migrations = Dependency(), Dependency()
    lifespan = lifespan_with(database)
    lifespan.add_check("migrations", migrations.check, readiness=False)
    async with started(lifespan):
        ready = await get(HealthApp(lifespan), "/health/ready")
    assert ready.status == 200
    assert list(ready.json()["checks"]) == ["database"]
    assert (database.calls, migrations.calls) == (2, 1)


async def test_not_ready_before_startup_while_draining_and_after_shutdown() -> None:
    database = Dependency()
    lifespan = lifespan_with(database)
    health = HealthApp(lifespan)
    idle = await get(health, "/health/ready")
    assert idle.status == 503
    assert idle.json() == {"status": "idle", "checks": {}}
    assert (await get(health, "/health/live")).status == 200

    await lifespan.startup()
    try:
        assert (await get(health, "/health/ready")).status == 200
        runs = database.calls
        lifespan.begin_drain()
        draining = await get(health, "/health/ready")
        readyz = await get(health, "/readyz")
        live = await get(health, "/health/live")
        summary = await get(health, "/health")
        assert database.calls == runs  # not ready whatever the checks say
    finally:
        await lifespan.shutdown()
    assert draining.status == readyz.status == 503
    assert draining.json() == {"status": "draining", "checks": {}}
    assert live.status == 200
    assert summary.json()["status"] == "unavailable"
    stopped = await get(health, "/health/ready")
    assert stopped.status == 503
    assert stopped.json()["status"] == "stopped"


async def test_without_a_lifespan_always_ready() -> None:
    health = HealthApp()
    ready = await get(health, "/health/ready")
    assert ready.status == 200
    assert ready.json() == {"status": "ready", "checks": {}}
    status = await get(HealthApp(status_details=True, version="9"), "/health/status")
    assert status.json() == {"version": "9", "ready": True, "status": "ready", "checks": {}}


async def test_error_strings_mask_url_credentials() -> None:
    database = Dependency()
    async with started(lifespan_with(database)) as lifespan:
        database.error = ConnectionError("cannot reach postgresql://user:secret@db/app")
        ready = await get(HealthApp(lifespan), "/health/ready")
    assert ready.status == 503
    error = ready.json()["checks"]["database"]["error"]
    assert error == "ConnectionError: cannot reach postgresql://user:***@db/app"
    assert b"secret" not in ready.body


# -- caching: a probe storm runs each check once per cache_ttl ----------------------------------


async def test_concurrent_probes_share_one_run_per_cache_ttl() -> None:
    database, cache = Dependency(), Dependency()
    database.delay = 0.05  # a run still going when the rest of the storm arrives
    lifespan = lifespan_with(database)
    lifespan.add_check("cache", cache.check)
    clock = FakeClock()
    health = HealthApp(lifespan, cache_ttl=0.3, clock=clock)
    statuses: list[int] = []

    async def probe(path: str) -> None:
        statuses.append((await get(health, path)).status)

    async def storm() -> None:
        async with anyio.create_task_group() as group:
            for i in range(100):
                group.start_soon(probe, ("/health/ready", "/readyz", "/health")[i % 3])

    async with started(lifespan):
        assert (database.calls, cache.calls) == (1, 1)  # the startup run
        with anyio.fail_after(5):
            await storm()
            assert (database.calls, cache.calls) == (2, 2)
            await storm()
            assert (database.calls, cache.calls) == (2, 2)  # within cache_ttl: cached
            clock.advance(0.29)
            await storm()
            assert (database.calls, cache.calls) == (2, 2)  # still within it
            clock.advance(0.02)
            await storm()
            assert (database.calls, cache.calls) == (3, 3)
    assert statuses == [200] * 400


async def test_cached_failure_is_served_until_cache_ttl_elapses() -> None:
    database = Dependency()
    async with started(lifespan_with(database)) as lifespan:
        clock = FakeClock()
        health = HealthApp(lifespan, cache_ttl=0.2, clock=clock)
        database.error = ConnectionError("refused")
        assert (await get(health, "/health/ready")).status == 503
        database.error = None
        clock.advance(0.19)
        assert (await get(health, "/health/ready")).status == 503
        clock.advance(0.02)
        assert (await get(health, "/health/ready")).status == 200


# -- paths, methods and headers ----------------------------------------------------------------


async def test_probe_aliases() -> None:
    async with started(lifespan_with(Dependency())) as lifespan:
        health = HealthApp(lifespan)
        livez = await get(health, "/livez")
        readyz = await get(health, "/readyz")
        without = HealthApp(lifespan, probe_aliases=False)
        missing = [(await get(without, path)).status for path in ("/livez", "/readyz")]
    assert livez.status == 200 and livez.json() == {"status": "alive"}
    assert readyz.status == 200 and readyz.json()["status"] == "ready"
    assert missing == [404, 404]
    assert health.paths == {
        "/health",
        "/health/drain",
        "/health/live",
        "/health/ready",
        "/health/status",
        "/livez",
        "/readyz",
    }


async def test_custom_path_and_unknown_paths() -> None:
    health = HealthApp(path="/_probe")
    assert (await get(health, "/_probe/live")).status == 200
    assert (await get(health, "/_probe/ready")).status == 200
    assert (await get(health, "/_probe")).json()["status"] == "ok"
    for path in ("/health/live", "/_probe/other", "/_probe/live/"):
        missing = await get(health, path)
        assert missing.status == 404, path
        assert missing.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_not_allowed(method: str) -> None:
    health = HealthApp(status_details=True)
    for path in ("/health/live", "/health/ready", "/health", "/livez", "/health/status"):
        response = await get(health, path, method)
        assert response.status == 405, path
        assert response.headers["allow"] == "GET, HEAD"
        assert response.json()["status"] == 405


async def test_head_has_no_body() -> None:
    database = Dependency()
    async with started(lifespan_with(database)) as lifespan:
        health = HealthApp(lifespan)
        for path in ("/health/live", "/health/ready", "/health"):
            full = await get(health, path)
            head = await get(health, path, "HEAD")
            assert head.status == full.status == 200
            assert head.body == b"", path
            assert head.headers["content-length"] == str(len(full.body))
        database.error = ConnectionError("down")
        health = HealthApp(lifespan, cache_ttl=0)
        head = await get(health, "/health/ready", "HEAD")
    assert head.status == 503 and head.body == b""


async def test_responses_are_never_cached() -> None:
    database = Dependency()
    async with started(lifespan_with(database)) as lifespan:
        health = HealthApp(lifespan, status_details=True, cache_ttl=0)
        responses = [
            await get(health, path)
            for path in ("/health/live", "/health/ready", "/health", "/health/status", "/livez")
        ]
        database.error = ConnectionError("down")
        responses.append(await get(health, "/health/ready"))
    assert [r.status for r in responses] == [200, 200, 200, 200, 200, 503]
    assert all(r.headers["cache-control"] == "no-store" for r in responses)


async def test_other_scopes_are_ignored() -> None:
    health = HealthApp()
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await health({"type": "websocket", "path": "/health/live"}, receive, send)
    assert sent == []


# -- status details ----------------------------------------------------------------------------


async def test_status_is_hidden_unless_enabled() -> None:
    async with started(lifespan_with(Dependency())) as lifespan:
        hidden = await get(HealthApp(lifespan), "/health/status")
        head = await get(HealthApp(lifespan), "/health/status", "HEAD")
    assert hidden.status == head.status == 404
    assert "uptime_seconds" not in hidden.body.decode()


async def test_status_details() -> None:
    database = Dependency()
    lifespan = lifespan_with(database)

    @lifespan.resource("pool")
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    lifespan.add_status("pool", lambda: {"size": 5, "checked_out": 1})

    async def breakers() -> dict[str, str]:
        return {"payments": "closed"}

    def broken() -> Any:
        raise RuntimeError("stats unavailable for postgresql://app:hunter2@db/app")

    lifespan.add_status("breakers", breakers)
    lifespan.add_status("broken", broken)
    health = HealthApp(lifespan, status_details=True, version="1.2.3")
    before = (await get(health, "/health/status")).json()
    async with started(lifespan):
        await anyio.sleep(0.01)
        response = await get(health, "/health/status")
    assert response.status == 200
    body = response.json()
    assert body["version"] == "1.2.3"
    assert body["state"] == "ready"
    assert body["ready"] is True
    assert 0 < body["uptime_seconds"] < 60
    assert body["checks"]["database"]["status"] == "up"
    assert body["resources"] == ["pool"]
    assert body["pool"] == {"size": 5, "checked_out": 1}
    assert body["breakers"] == {"payments": "closed"}
    assert body["broken"] == {
        "error": "RuntimeError: stats unavailable for postgresql://app:***@db/app"
    }
    assert before["state"] == "idle"
    assert before["uptime_seconds"] is None
    assert before["ready"] is False


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["health", "/health/", "/", ""])
def test_path_is_validated(path: str) -> None:
    with pytest.raises(ValueError, match="path must start with '/' and not end with it"):
        HealthApp(path=path)


@pytest.mark.parametrize("cache_ttl", [-1, float("nan")])
def test_cache_ttl_is_validated(cache_ttl: float) -> None:
    with pytest.raises(ValueError, match="cache_ttl must be >= 0 seconds"):
        HealthApp(cache_ttl=cache_ttl)


# -- through resilient() -----------------------------------------------------------------------


async def test_health_through_resilient() -> None:
    database = Dependency()
    lifespan = lifespan_with(database)
    app = resilient(
        user_app(),
        lifespan=lifespan,
        health_status_details=True,
        health_cache_ttl=0,  # every probe runs the checks (caching: HealthApp's own tests)
        version="2.0",
    )
    assert app.health is not None and app.health.lifespan is lifespan
    assert app.health.cache_ttl == 0
    async with started(lifespan), client_for(app) as client:
        assert (await client.get("/")).text == "home"
        ready = await client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"]["database"]["status"] == "up"
        assert "x-request-id" in ready.headers

        database.error = ConnectionError("cannot reach postgresql://user:secret@db/app")
        live = await client.get("/health/live")
        livez = await client.get("/livez")
        not_ready = await client.get("/health/ready")
        readyz = await client.get("/readyz")
        status = await client.get("/health/status")
        post = await client.post("/health/ready")
        head = await client.head("/health/ready")
    assert live.status_code == livez.status_code == 200
    assert not_ready.status_code == readyz.status_code == 503
    check = not_ready.json()["checks"]["database"]
    assert check["status"] == "down"
    assert check["error"] == "ConnectionError: cannot reach postgresql://user:***@db/app"
    assert "secret" not in not_ready.text
    assert not_ready.headers["cache-control"] == "no-store"
    assert status.status_code == 200
    assert status.json()["version"] == "2.0"
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
    assert head.status_code == 503 and head.content == b""


@pytest.mark.parametrize("envelope", [False, True], ids=["problem", "envelope"])
async def test_readiness_body_keeps_its_shape_through_resilient(envelope: bool) -> None:
    database = Dependency()
    lifespan = lifespan_with(database)
    app = resilient(user_app(), lifespan=lifespan, envelope=envelope, health_cache_ttl=0)
    async with started(lifespan), client_for(app) as client:
        direct = await get(HealthApp(lifespan), "/health/ready")
        database.error = ConnectionError("refused")
        not_ready = await client.get("/health/ready")
        lifespan.begin_drain()
        draining = await client.get("/health/ready")
        summary = await client.get("/health")
    assert direct.json()["status"] == "ready"
    assert not_ready.status_code == draining.status_code == summary.status_code == 503
    for response in (not_ready, draining, summary):
        assert response.headers["content-type"] == "application/json"
    assert not_ready.json()["status"] == "not_ready"
    assert not_ready.json()["checks"]["database"]["status"] == "down"
    assert draining.json() == {"status": "draining", "checks": {}}
    assert summary.json() == {"status": "unavailable", "live": True, "ready": False}
