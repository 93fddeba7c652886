from __future__ import annotations

import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from time import perf_counter, sleep
from typing import Any, Literal

import anyio
import anyio.lowlevel
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from asgi_resilience import Lifespan, LifespanMiddleware, StartupError, resilient
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send
from tests.asgi import call, http_scope, wait_until

Kind = Literal["wrap", "starlette"]
KINDS: list[Kind] = ["wrap", "starlette"]
LIFESPAN_LOGGER = "asgi_resilience.lifespan"


# -- helpers -------------------------------------------------------------------------------


async def read_state(request: Request) -> JSONResponse:
    return JSONResponse({"value": getattr(request.state, request.path_params["name"])})


def starlette_app(lifespan: Lifespan | None = None) -> Starlette:
    return Starlette(routes=[Route("/state/{name}", read_state)], lifespan=lifespan)


def make_app(kind: Kind, lifespan: Lifespan) -> ASGIApp:
    """The two ways of running a ``Lifespan``: around an app, or as the framework's lifespan."""
    return lifespan.wrap(starlette_app()) if kind == "wrap" else starlette_app(lifespan)


def add_generator(
    lifespan: Lifespan, name: str, events: list[str], *, timeout: float = 5.0
) -> None:
    @lifespan.resource(name, timeout=timeout)
    async def resource() -> AsyncIterator[str]:
        events.append(f"open {name}")
        yield f"{name} value"
        events.append(f"close {name}")


def add_closer(lifespan: Lifespan, name: str, events: list[str]) -> None:
    lifespan.add_resource(name, lambda: events.append(f"close {name}"))


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def as_startup_error(exc: BaseException) -> StartupError:
    """The ``StartupError`` raised, out of the exception group a trio nursery may add."""
    while not isinstance(exc, StartupError):
        group: Sequence[BaseException] = getattr(exc, "exceptions", ())
        assert len(group) == 1, f"expected a StartupError, got {exc!r}"
        exc = group[0]
    return exc


async def failed_startup_with_manager(app: ASGIApp) -> StartupError:
    try:
        async with LifespanManager(app):
            pass
    except Exception as exc:
        return as_startup_error(exc)
    pytest.fail("startup succeeded")


def failed_startup_with_testclient(app: ASGIApp) -> StartupError:
    try:
        with TestClient(app):
            pass
    except Exception as exc:
        return as_startup_error(exc)
    pytest.fail("startup succeeded")


async def send_text(send: Send, text: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


def lifespan_scope() -> Scope:
    return {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}


# -- failed startup, with asgi-lifespan and with Starlette's TestClient ----------------------


@dataclass(frozen=True)
class FailedStartup:
    """A lifespan whose startup fails, what the failure says, and what it opened and closed."""

    build: Callable[[list[str]], Lifespan]
    messages: tuple[str, ...]
    events: tuple[str, ...]
    max_seconds: float = 5.0


def _failing_checks(events: list[str]) -> Lifespan:
    lifespan = Lifespan()
    add_generator(lifespan, "cache", events)
    add_closer(lifespan, "client", events)

    @lifespan.check("database")
    async def database() -> None:
        raise ConnectionError("connection refused")

    lifespan.add_check("queue", lambda: False)  # sync, run in a worker thread
    lifespan.add_check("fine", lambda: None)
    return lifespan


def _hanging_check(events: list[str]) -> Lifespan:
    lifespan = Lifespan()
    add_generator(lifespan, "cache", events)
    add_closer(lifespan, "client", events)
    lifespan.add_check("search", anyio.sleep_forever, timeout=0.1)
    return lifespan


def _resource_setup_raises(events: list[str]) -> Lifespan:
    lifespan = Lifespan()
    add_generator(lifespan, "cache", events)
    add_closer(lifespan, "client", events)

    @lifespan.resource("broker")
    async def broker() -> AsyncIterator[None]:
        events.append("open broker")
        raise OSError("broker unreachable")
        yield

    add_generator(lifespan, "after", events)
    lifespan.add_check("never", lambda: events.append("check ran"))
    return lifespan


def _resource_setup_hangs(events: list[str]) -> Lifespan:
    lifespan = Lifespan()
    add_generator(lifespan, "cache", events)
    add_closer(lifespan, "client", events)

    @lifespan.resource("stuck", timeout=0.1)
    async def stuck() -> AsyncIterator[None]:
        events.append("open stuck")
        await anyio.sleep_forever()
        yield

    lifespan.add_check("never", lambda: events.append("check ran"))
    return lifespan


def _startup_timeout(events: list[str]) -> Lifespan:
    lifespan = Lifespan(startup_timeout=0.2)
    add_generator(lifespan, "cache", events)
    lifespan.add_check("slow", anyio.sleep_forever, timeout=5)
    return lifespan


FAILED_STARTUPS = {
    "check-fails": FailedStartup(
        _failing_checks,
        (
            r"check 'database' failed: ConnectionError: connection refused",
            r"check 'queue' failed: returned False",
        ),
        ("open cache", "close client", "close cache"),
    ),
    "check-hangs": FailedStartup(
        _hanging_check,
        (r"check 'search' failed: timed out after 0\.1s",),
        ("open cache", "close client", "close cache"),
        max_seconds=0.1 + 0.5,
    ),
    "resource-raises": FailedStartup(
        _resource_setup_raises,
        (r"resource 'broker' could not be opened: OSError: broker unreachable",),
        ("open cache", "open broker", "close client", "close cache"),
    ),
    "resource-hangs": FailedStartup(
        _resource_setup_hangs,
        (r"resource 'stuck' did not open within 0\.1s",),
        ("open cache", "open stuck", "close client", "close cache"),
        max_seconds=0.1 + 0.5,
    ),
    "startup-timeout": FailedStartup(
        _startup_timeout,
        (r"timed out after 0\.2s",),
        ("open cache", "close cache"),
        max_seconds=0.2 + 0.5,
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", FAILED_STARTUPS.values(), ids=FAILED_STARTUPS.keys())
async def test_failed_startup_with_lifespan_manager(
    case: FailedStartup, kind: Kind, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    lifespan = case.build(events)
    began = perf_counter()
    error = await failed_startup_with_manager(make_app(kind, lifespan))
    elapsed = perf_counter() - began
    for message in case.messages:
        assert re.search(message, str(error)), str(error)
    assert events == list(case.events)
    assert elapsed < case.max_seconds
    assert lifespan.state == "failed"
    logged = [r for r in caplog.records if r.name == LIFESPAN_LOGGER and r.levelno >= logging.ERROR]
    assert any(re.search(case.messages[0], r.getMessage()) for r in logged)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", FAILED_STARTUPS.values(), ids=FAILED_STARTUPS.keys())
def test_failed_startup_with_testclient(case: FailedStartup, kind: Kind) -> None:
    events: list[str] = []
    lifespan = case.build(events)
    began = perf_counter()
    error = failed_startup_with_testclient(make_app(kind, lifespan))
    elapsed = perf_counter() - began
    for message in case.messages:
        assert re.search(message, str(error)), str(error)
    assert events == list(case.events)
    assert elapsed < case.max_seconds
    assert lifespan.state == "failed"


@pytest.mark.anyio
async def test_startup_failed_message_names_each_check_and_masks_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan = Lifespan()

    @lifespan.check("database")
    async def database() -> None:
        raise ConnectionError("cannot reach postgresql://user:secret@db/app")

    @lifespan.check("cache", attempts=2)
    async def cache() -> bool:
        return False

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(StartupError) as raised:
        await lifespan.wrap(starlette_app())(lifespan_scope(), receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    message = sent[0]["message"]
    assert message == str(raised.value)
    masked = "postgresql://user:***@db/app"
    assert f"check 'database' failed: ConnectionError: cannot reach {masked}" in message
    assert "check 'cache' failed: returned False" in message
    assert {r.name for r in raised.value.failures} == {"database", "cache"}
    assert lifespan.startup_results["cache"].attempts == 2
    assert "secret" not in message
    assert not any("secret" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_a_resource_raising_timeout_error_is_not_reported_as_its_own_timeout() -> None:
    lifespan = Lifespan()

    @lifespan.resource("db", timeout=5)
    async def db() -> AsyncIterator[None]:
        raise TimeoutError("connect to db:5432 timed out after 0.5s")
        yield

    began = perf_counter()
    with pytest.raises(StartupError) as raised:
        await lifespan.startup()
    assert perf_counter() - began < 1
    assert str(raised.value) == (
        "startup failed: resource 'db' could not be opened: "
        "TimeoutError: connect to db:5432 timed out after 0.5s"
    )


# -- startup that succeeds -----------------------------------------------------------------


def flaky_lifespan(events: list[str], calls: list[float]) -> Lifespan:
    lifespan = Lifespan()
    add_generator(lifespan, "cache", events)

    @lifespan.check("database", timeout=1, attempts=3)
    async def database() -> None:
        calls.append(perf_counter())
        if len(calls) < 3:
            raise ConnectionError("not yet")

    return lifespan


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_check_passing_on_third_attempt_with_lifespan_manager(kind: Kind) -> None:
    events: list[str] = []
    calls: list[float] = []
    lifespan = flaky_lifespan(events, calls)
    async with LifespanManager(make_app(kind, lifespan)) as manager:
        assert lifespan.ready
        async with client_for(manager.app) as client:
            response = await client.get("/state/cache")
    assert response.json() == {"value": "cache value"}
    assert len(calls) == 3
    assert calls[2] - calls[0] >= 0.25  # backed off between the attempts
    result = lifespan.startup_results["database"]
    assert result.ok and result.attempts == 3 and result.error is None
    assert events == ["open cache", "close cache"]
    assert lifespan.state == "stopped"


def test_check_passing_on_third_attempt_with_testclient() -> None:
    events: list[str] = []
    calls: list[float] = []
    lifespan = flaky_lifespan(events, calls)
    with TestClient(starlette_app(lifespan)) as client:
        assert client.get("/state/cache").json() == {"value": "cache value"}
    assert len(calls) == 3
    assert lifespan.startup_results["database"].attempts == 3
    assert events == ["open cache", "close cache"]


def test_non_critical_failure_starts_degraded(caplog: pytest.LogCaptureFixture) -> None:
    lifespan = Lifespan()

    @lifespan.check("recommendations", critical=False)
    async def recommendations() -> None:
        raise ConnectionError("recommendations unreachable")

    with TestClient(resilient(starlette_app(), lifespan=lifespan)) as client:
        assert lifespan.state == "ready"
        ready = client.get("/health/ready")
        summary = client.get("/health")
    assert ready.status_code == 200
    check = ready.json()["checks"]["recommendations"]
    assert check["status"] == "down" and check["critical"] is False
    assert check["error"] == "ConnectionError: recommendations unreachable"
    assert summary.status_code == 200
    assert summary.json()["status"] == "degraded"
    warnings = [
        r for r in caplog.records if r.name == LIFESPAN_LOGGER and r.levelno == logging.WARNING
    ]
    assert any("recommendations" in r.getMessage() for r in warnings)


@pytest.mark.anyio
async def test_non_critical_failure_starts_degraded_with_lifespan_manager(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan = Lifespan()
    lifespan.add_check("search", anyio.sleep_forever, timeout=0.05, critical=False)
    async with LifespanManager(starlette_app(lifespan)):
        assert lifespan.state == "ready"
        assert lifespan.startup_results["search"].error == "timed out after 0.05s"
    assert any(
        r.levelno == logging.WARNING and "search" in r.getMessage()
        for r in caplog.records
        if r.name == LIFESPAN_LOGGER
    )


# -- Starlette and FastAPI lifespans -------------------------------------------------------


def fastapi_app(lifespan: Lifespan) -> FastAPI:
    app = FastAPI(lifespan=lifespan)

    @app.get("/state/{name}")
    async def state(name: str, request: Request) -> dict[str, Any]:
        return {"value": getattr(request.state, name)}

    return app


def registered(events: list[str]) -> Lifespan:
    lifespan = Lifespan()
    add_generator(lifespan, "cache", events)
    add_generator(lifespan, "db", events)
    add_closer(lifespan, "client", events)
    return lifespan


@pytest.mark.parametrize("framework", [starlette_app, fastapi_app], ids=["starlette", "fastapi"])
def test_framework_lifespan_with_testclient(framework: Callable[[Lifespan], ASGIApp]) -> None:
    events: list[str] = []
    lifespan = registered(events)
    with TestClient(framework(lifespan)) as client:
        assert client.get("/state/cache").json() == {"value": "cache value"}
        assert client.get("/state/db").json() == {"value": "db value"}
        assert events == ["open cache", "open db"]
    assert events == ["open cache", "open db", "close client", "close db", "close cache"]
    assert [r.name for r in lifespan.shutdown_report] == ["client", "db", "cache"]


@pytest.mark.anyio
@pytest.mark.parametrize("framework", [starlette_app, fastapi_app], ids=["starlette", "fastapi"])
async def test_framework_lifespan_with_lifespan_manager(
    framework: Callable[[Lifespan], ASGIApp],
) -> None:
    events: list[str] = []
    lifespan = registered(events)
    async with LifespanManager(framework(lifespan)) as manager:
        async with client_for(manager.app) as client:
            response = await client.get("/state/db")
    assert response.json() == {"value": "db value"}
    assert events == ["open cache", "open db", "close client", "close db", "close cache"]


# -- wrapping an app with its own lifespan ---------------------------------------------------


def app_with_own_lifespan(events: list[str]) -> Starlette:
    @asynccontextmanager
    async def own_lifespan(app: Starlette) -> AsyncIterator[dict[str, str]]:
        events.append("inner startup")
        yield {"inner": "inner value"}
        events.append("inner shutdown")

    return Starlette(routes=[Route("/state/{name}", read_state)], lifespan=own_lifespan)


def checked(events: list[str]) -> Lifespan:
    lifespan = Lifespan()
    add_generator(lifespan, "cache", events)
    add_closer(lifespan, "client", events)

    @lifespan.check("database")
    async def database() -> None:
        events.append("check database")

    return lifespan


EXPECTED_ORDER = [
    "open cache",
    "check database",
    "inner startup",
    "serving",
    "inner shutdown",
    "close client",
    "close cache",
]


def test_wrapped_app_keeps_its_lifespan_with_testclient() -> None:
    events: list[str] = []
    lifespan = checked(events)
    with TestClient(resilient(app_with_own_lifespan(events), lifespan=lifespan)) as client:
        events.append("serving")
        assert client.get("/state/inner").json() == {"value": "inner value"}
        assert client.get("/state/cache").json() == {"value": "cache value"}
    assert events == EXPECTED_ORDER


@pytest.mark.anyio
async def test_wrapped_app_keeps_its_lifespan_with_lifespan_manager() -> None:
    events: list[str] = []
    lifespan = checked(events)
    async with LifespanManager(lifespan.wrap(app_with_own_lifespan(events))) as manager:
        events.append("serving")
        async with client_for(manager.app) as client:
            inner = await client.get("/state/inner")
            cache = await client.get("/state/cache")
    assert inner.json() == {"value": "inner value"}
    assert cache.json() == {"value": "cache value"}
    assert events == EXPECTED_ORDER


async def rejects_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send_text(send, scope["state"]["cache"])


async def ignores_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send_text(send, scope["state"]["cache"])


WITHOUT_LIFESPAN = [rejects_lifespan, ignores_lifespan]


@pytest.mark.parametrize("app", WITHOUT_LIFESPAN, ids=["rejects", "returns"])
def test_wrapped_app_without_lifespan_support_with_testclient(app: ASGIApp) -> None:
    events: list[str] = []
    lifespan = checked(events)
    with TestClient(lifespan.wrap(app)) as client:
        assert lifespan.state == "ready"
        assert client.get("/").text == "cache value"
    assert events == ["open cache", "check database", "close client", "close cache"]


@pytest.mark.anyio
@pytest.mark.parametrize("app", WITHOUT_LIFESPAN, ids=["rejects", "returns"])
async def test_wrapped_app_without_lifespan_support_with_lifespan_manager(app: ASGIApp) -> None:
    events: list[str] = []
    lifespan = checked(events)
    async with LifespanManager(resilient(app, lifespan=lifespan)) as manager:
        assert lifespan.state == "ready"
        async with client_for(manager.app) as client:
            response = await client.get("/")
    assert response.text == "cache value"
    assert events == ["open cache", "check database", "close client", "close cache"]


async def sends_startup_failed(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "bad configuration"})


async def raises_after_startup(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    raise RuntimeError("bad configuration")


def starlette_failing_startup() -> Starlette:
    @asynccontextmanager
    async def own_lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("bad configuration")
        yield

    return Starlette(lifespan=own_lifespan)


FAILING_INNER = {
    "sends-failed": lambda: sends_startup_failed,
    "raises-after-receive": lambda: raises_after_startup,
    "starlette": starlette_failing_startup,
}


@pytest.mark.anyio
@pytest.mark.parametrize("make_inner", FAILING_INNER.values(), ids=FAILING_INNER.keys())
async def test_wrapped_app_startup_failure_with_lifespan_manager(
    make_inner: Callable[[], ASGIApp],
) -> None:
    events: list[str] = []
    lifespan = checked(events)
    error = await failed_startup_with_manager(lifespan.wrap(make_inner()))
    assert "bad configuration" in str(error)
    assert events == ["open cache", "check database", "close client", "close cache"]
    assert lifespan.state == "failed"


@pytest.mark.parametrize("make_inner", FAILING_INNER.values(), ids=FAILING_INNER.keys())
def test_wrapped_app_startup_failure_with_testclient(make_inner: Callable[[], ASGIApp]) -> None:
    events: list[str] = []
    lifespan = checked(events)
    error = failed_startup_with_testclient(resilient(make_inner(), lifespan=lifespan))
    assert "bad configuration" in str(error)
    assert events == ["open cache", "check database", "close client", "close cache"]
    assert lifespan.state == "failed"


@pytest.mark.anyio
async def test_wrapped_app_startup_failure_message_reaches_the_server() -> None:
    events: list[str] = []
    lifespan = checked(events)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(StartupError):
        await LifespanMiddleware(sends_startup_failed, lifespan=lifespan)(
            lifespan_scope(), receive, send
        )
    assert sent == [
        {
            "type": "lifespan.startup.failed",
            "message": "application startup failed: bad configuration",
        }
    ]


# -- shutdown ------------------------------------------------------------------------------


class Closers:
    """Closers of every kind that record when they are attempted and when they finish."""

    def __init__(self, lifespan: Lifespan) -> None:
        self.lifespan = lifespan
        self.attempted: list[str] = []
        self.closed: list[str] = []

    def sync(self, name: str, *, fail: bool = False) -> None:
        def close() -> None:
            self.attempted.append(name)
            if fail:
                raise ValueError(f"{name} broke")
            self.closed.append(name)

        self.lifespan.add_resource(name, close)

    def record(self, name: str) -> None:
        self.attempted.append(name)
        self.closed.append(name)

    def lambda_(self, name: str) -> None:
        self.lifespan.add_resource(name, lambda: self.record(name))

    def async_(self, name: str, *, hang: bool = False, timeout: float = 5.0) -> None:
        async def close() -> None:
            self.attempted.append(name)
            if hang:
                await anyio.sleep_forever()
            await anyio.lowlevel.checkpoint()
            self.closed.append(name)

        self.lifespan.add_resource(name, close, timeout=timeout)

    def generator(
        self, name: str, *, hang: bool = False, fail: bool = False, timeout: float = 5.0
    ) -> None:
        @self.lifespan.resource(name, timeout=timeout)
        async def resource() -> AsyncIterator[str]:
            yield name
            self.attempted.append(name)
            if hang:
                await anyio.sleep_forever()
            if fail:
                raise RuntimeError(f"{name} broke")
            self.closed.append(name)


@pytest.mark.anyio
async def test_shutdown_isolates_errors_and_abandons_hanging_resources(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan = Lifespan(shutdown_timeout=3)
    closers = Closers(lifespan)
    closers.generator("r0")
    closers.sync("r1")
    closers.async_("r2", hang=True, timeout=0.2)
    closers.generator("r3", fail=True)
    closers.async_("r4")
    closers.generator("r5", hang=True, timeout=0.2)
    closers.sync("r6", fail=True)
    closers.async_("r7", hang=True, timeout=0.2)
    closers.generator("r8")
    closers.lambda_("r9")
    await lifespan.startup()
    assert lifespan.values == {"r0": "r0", "r3": "r3", "r5": "r5", "r8": "r8"}

    began = perf_counter()
    report = await lifespan.shutdown()
    elapsed = perf_counter() - began

    names = [f"r{i}" for i in reversed(range(10))]
    assert closers.attempted == names
    assert closers.closed == ["r9", "r8", "r4", "r1", "r0"]
    assert [r.name for r in report] == names
    outcomes = {r.name: r.outcome for r in report}
    assert outcomes == {
        **dict.fromkeys(["r9", "r8", "r4", "r1", "r0"], "ok"),
        **dict.fromkeys(["r7", "r5", "r2"], "timeout"),
        **dict.fromkeys(["r6", "r3"], "error"),
    }
    by_name = {r.name: r for r in report}
    assert by_name["r6"].error == "ValueError: r6 broke"
    assert by_name["r3"].error == "RuntimeError: r3 broke"
    for name in ("r7", "r5", "r2"):
        assert by_name[name].error == "cancelled after 0.2s"
        assert not by_name[name].abandoned  # it stopped when cancelled
        assert 0.15 <= by_name[name].duration < 0.2 + 0.5
    assert all(r.duration >= 0 for r in report)
    assert all(r.error is None for r in report if r.outcome == "ok")
    assert 0.55 <= elapsed <= lifespan.shutdown_timeout
    assert lifespan.state == "stopped"

    logged = [r for r in caplog.records if r.name == LIFESPAN_LOGGER and "Shutdown" in r.msg]
    assert len(logged) == 1
    assert logged[0].levelno == logging.WARNING
    for resource in report:
        assert f"{resource.name} {resource.outcome}" in logged[0].getMessage()

    again = await lifespan.shutdown()
    assert again == report
    assert closers.attempted == names
    assert len([r for r in caplog.records if "Shutdown" in r.msg]) == 1


@pytest.mark.anyio
async def test_clean_shutdown_report_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    lifespan = Lifespan()
    closers = Closers(lifespan)
    closers.sync("sync")
    closers.async_("async")
    closers.lambda_("lambda")
    closers.generator("generator")
    await lifespan.startup()
    report = await lifespan.shutdown()
    assert [(r.name, r.outcome) for r in report] == [
        ("generator", "ok"),
        ("lambda", "ok"),
        ("async", "ok"),
        ("sync", "ok"),
    ]
    assert closers.closed == ["generator", "lambda", "async", "sync"]
    logged = [r for r in caplog.records if r.name == LIFESPAN_LOGGER and "Shutdown" in r.msg]
    assert [r.levelno for r in logged] == [logging.INFO]


@pytest.mark.anyio
async def test_shutdown_timeout_bounds_the_whole_shutdown() -> None:
    lifespan = Lifespan(shutdown_timeout=0.3)
    closers = Closers(lifespan)
    closers.async_("late_async")
    closers.lambda_("late_sync")
    closers.async_("hang2", hang=True, timeout=0.2)
    closers.async_("hang1", hang=True, timeout=0.2)
    await lifespan.startup()
    began = perf_counter()
    report = await lifespan.shutdown()
    elapsed = perf_counter() - began
    assert [r.name for r in report] == ["hang1", "hang2", "late_sync", "late_async"]
    assert [r.outcome for r in report] == ["timeout", "timeout", "ok", "ok"]
    assert report[0].error == "cancelled after 0.2s"
    assert (report[1].error or "").startswith("cancelled after 0.")  # what was left of the 0.3 s
    # Past shutdown_timeout, the resources not reached share one more second: still closed.
    assert closers.closed == ["late_sync", "late_async"]
    assert elapsed <= 0.3 + 0.2 + 0.25  # the hung closes' time, and their unwinding


@pytest.mark.anyio
async def test_past_shutdown_timeout_the_last_second_is_shared_by_what_is_left() -> None:
    lifespan = Lifespan(shutdown_timeout=0.2)
    closers = Closers(lifespan)
    closers.async_("first")
    closers.async_("hang2", hang=True, timeout=5)
    closers.async_("hang1", hang=True, timeout=5)
    await lifespan.startup()
    began = perf_counter()
    report = await lifespan.shutdown()
    elapsed = perf_counter() - began
    assert [(r.name, r.outcome) for r in report] == [
        ("hang1", "timeout"),
        ("hang2", "timeout"),
        ("first", "ok"),
    ]
    assert closers.closed == ["first"]  # hang2 took only its share of the last second
    assert elapsed < 0.2 + 1 + 0.5


@pytest.mark.anyio
async def test_shutdown_is_not_cut_short_by_cancellation() -> None:
    lifespan = Lifespan()
    closers = Closers(lifespan)
    closers.async_("first")
    closers.generator("second")
    closers.sync("third")
    await lifespan.startup()
    with anyio.CancelScope() as scope:
        scope.cancel()
        report = await lifespan.shutdown()
    assert [r.outcome for r in report] == ["ok", "ok", "ok"]
    assert closers.closed == ["third", "second", "first"]


@pytest.mark.anyio
async def test_resource_yielding_twice_is_an_error() -> None:
    lifespan = Lifespan()
    after_second_yield: list[str] = []

    @lifespan.resource("greedy")
    async def greedy() -> AsyncIterator[int]:
        yield 1
        yield 2
        after_second_yield.append("ran")

    await lifespan.startup()
    assert lifespan.values == {"greedy": 1}
    (report,) = await lifespan.shutdown()
    assert report.name == "greedy" and report.outcome == "error"
    assert report.error is not None and "yielded more than once" in report.error
    assert after_second_yield == []


@pytest.mark.anyio
async def test_shutdown_before_startup_does_nothing() -> None:
    lifespan = Lifespan()
    closers = Closers(lifespan)
    closers.sync("never")
    assert await lifespan.shutdown() == []
    assert closers.attempted == []
    assert lifespan.state == "idle"


# -- draining in-flight requests ---------------------------------------------------------------


def slow_app(events: list[str], started: anyio.Event, release: anyio.Event) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        events.append("request started")
        started.set()
        await release.wait()
        await send_text(send, "done")
        events.append("request done")

    return app


@pytest.mark.anyio
async def test_shutdown_waits_for_in_flight_requests() -> None:
    events: list[str] = []
    started, release = anyio.Event(), anyio.Event()
    lifespan = Lifespan(drain_timeout=5)
    add_closer(lifespan, "db", events)
    app = lifespan.wrap(slow_app(events, started, release))
    await lifespan.startup()

    async def release_later() -> None:
        # Once the shutdown waits for the request (its drained event exists), not on a timer.
        await wait_until(lambda: lifespan.drained is not None)
        events.append("releasing")
        release.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(call, app, http_scope("/slow"))
            await started.wait()
            assert lifespan.in_flight == 1
            group.start_soon(release_later)
            events.append("shutdown")
            await lifespan.shutdown()
            events.append("shutdown done")
    assert events == [
        "request started",
        "shutdown",
        "releasing",
        "request done",
        "close db",
        "shutdown done",
    ]
    assert lifespan.in_flight == 0


@pytest.mark.anyio
async def test_shutdown_waits_for_in_flight_requests_with_lifespan_manager() -> None:
    events: list[str] = []
    started, release = anyio.Event(), anyio.Event()
    lifespan = Lifespan(drain_timeout=5)
    add_closer(lifespan, "db", events)
    app = lifespan.wrap(slow_app(events, started, release))

    async def release_later() -> None:
        # Once the shutdown waits for the request (its drained event exists), not on a timer.
        await wait_until(lambda: lifespan.drained is not None)
        events.append("releasing")
        release.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            async with LifespanManager(app):
                group.start_soon(call, app, http_scope("/slow"))
                await started.wait()
                group.start_soon(release_later)
                events.append("shutdown")
            events.append("shutdown done")
    assert events == [
        "request started",
        "shutdown",
        "releasing",
        "request done",
        "close db",
        "shutdown done",
    ]


@pytest.mark.anyio
async def test_shutdown_stops_waiting_after_drain_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    started, release = anyio.Event(), anyio.Event()
    lifespan = Lifespan(drain_timeout=0.2)
    add_closer(lifespan, "db", events)
    app = lifespan.wrap(slow_app(events, started, release))
    await lifespan.startup()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(call, app, http_scope("/slow"))
            await started.wait()
            began = perf_counter()
            await lifespan.shutdown()
            elapsed = perf_counter() - began
            events.append("shutdown done")
            release.set()
    assert 0.15 <= elapsed < 0.2 + 0.5
    assert events == ["request started", "close db", "shutdown done", "request done"]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == LIFESPAN_LOGGER and r.levelno == logging.WARNING
    ]
    assert "1 requests still in flight after 0.2s" in warnings


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"startup_timeout": 0}, "startup_timeout must be a number of seconds > 0"),
        ({"shutdown_timeout": -1}, "shutdown_timeout must be a number of seconds > 0"),
        ({"drain_timeout": 0}, "drain_timeout must be a number of seconds > 0"),
        ({"drain_delay": -0.5}, "drain_delay must be a number of seconds >= 0"),
        ({"startup_timeout": float("nan")}, "startup_timeout"),
        # wrong types name the option too, rather than a TypeError from a comparison
        ({"drain_delay": "5"}, "drain_delay must be a number of seconds >= 0 .* got '5'"),
        ({"shutdown_timeout": None}, "shutdown_timeout must be a number"),
        ({"drain_timeout": True}, "drain_timeout must be a number"),
        ({"shutdown_timeout": float("inf")}, "shutdown_timeout"),
    ],
)
def test_lifespan_options_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Lifespan(**options)


def ok_check() -> None:
    """A check (or close) that passes."""


def test_check_options_are_validated() -> None:
    lifespan = Lifespan()

    @lifespan.check("database")
    async def database() -> None:
        pass

    assert lifespan.checks["database"].function is database
    with pytest.raises(ValueError, match="a check named 'database' is already registered"):
        lifespan.add_check("database", database)
    with pytest.raises(ValueError, match="a check named 'database' is already registered"):
        lifespan.check("database")(database)
    with pytest.raises(ValueError, match=r"check 'cache': timeout must be a number of seconds"):
        lifespan.add_check("cache", database, timeout=0)
    with pytest.raises(ValueError, match=r"check 'cache': attempts must be a whole number >= 1"):
        lifespan.add_check("cache", database, attempts=0)
    assert list(lifespan.checks) == ["database"]


@pytest.mark.parametrize(
    ("register", "message"),
    [
        (lambda ls: ls.add_check("", ok_check), r"a check's name must be a non-empty string"),
        (lambda ls: ls.add_check(5, ok_check), r"a check's name must be a non-empty string"),
        (lambda ls: ls.add_check("c", "SELECT 1"), r"check 'c': function must be callable"),
        (lambda ls: ls.add_check("c", ok_check, timeout="2"), r"check 'c': timeout must be a num"),
        (lambda ls: ls.add_check("c", ok_check, timeout=None), r"check 'c': timeout must be a num"),
        (
            lambda ls: ls.add_check("c", ok_check, critical="no"),
            r"check 'c': critical must be True",
        ),
        (lambda ls: ls.add_check("c", ok_check, readiness=1), r"check 'c': readiness must be True"),
        (
            lambda ls: ls.add_check("c", ok_check, attempts=2.5),
            r"check 'c': attempts must be a who",
        ),
        (
            lambda ls: ls.add_check("c", ok_check, attempts=True),
            r"check 'c': attempts must be a wh",
        ),
        (lambda ls: ls.check("c", timeout=-1)(ok_check), r"check 'c': timeout must be a number"),
        (lambda ls: ls.add_resource("r", None), r"resource 'r': close must be callable"),
        (lambda ls: ls.add_resource("r", ok_check, timeout="5"), r"resource 'r': timeout must be"),
        (lambda ls: ls.add_resource("", ok_check), r"a resource's name must be a non-empty str"),
        (lambda ls: ls.add_status("pool", {"size": 1}), r"status section 'pool': provider must be"),
        (lambda ls: ls.add_status(None, ok_check), r"a status section's name must be a non-empty"),
    ],
)
def test_registration_refuses_wrong_values_naming_them(register: Any, message: str) -> None:
    lifespan = Lifespan()
    with pytest.raises(ValueError, match=message):
        register(lifespan)
    assert not lifespan.checks and not lifespan.resource_names


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"logger": "app"}, "logger must be a logging.Logger or LoggerAdapter or None, got 'app'"),
        ({"registry": {}}, "registry must be a prometheus_client CollectorRegistry or None"),
    ],
)
def test_lifespan_refuses_objects_of_the_wrong_kind(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Lifespan(**options)


@pytest.mark.anyio
async def test_the_phases_refuse_to_run_out_of_order() -> None:
    lifespan = Lifespan()
    opened: list[str] = []
    add_generator(lifespan, "db", opened)
    with pytest.raises(RuntimeError, match="cannot finish the startup of a lifespan that is idle"):
        lifespan.finish_startup()
    with pytest.raises(RuntimeError, match="cannot abort the startup of a lifespan that is idle"):
        await lifespan.abort_startup()
    await lifespan.begin_startup()
    with pytest.raises(RuntimeError, match="cannot start a lifespan that is starting"):
        await lifespan.begin_startup()
    lifespan.finish_startup()
    with pytest.raises(RuntimeError, match="cannot start a lifespan that is ready"):
        await lifespan.begin_startup()  # resources are not opened twice
    assert opened.count("open db") == 1
    assert await lifespan.begin_shutdown() is True
    await lifespan.finish_shutdown()
    assert lifespan.state == "stopped" and lifespan.drained is None
    await lifespan.begin_startup()  # again after a stop: a restart
    lifespan.finish_startup()
    await lifespan.shutdown()


def test_a_logger_adapter_is_a_logger_for_the_lifespan() -> None:
    adapter = logging.LoggerAdapter(logging.getLogger("tests.lifespan"), {"service": "api"})
    assert Lifespan(logger=adapter).logger is adapter  # type: ignore[arg-type,comparison-overlap]


def test_resource_options_are_validated() -> None:
    lifespan = Lifespan()
    add_generator(lifespan, "db", [])
    with pytest.raises(ValueError, match="a resource named 'db' is already registered"):
        lifespan.add_resource("db", lambda: None)
    with pytest.raises(ValueError, match="a resource named 'db' is already registered"):
        add_generator(lifespan, "db", [])
    with pytest.raises(ValueError, match=r"resource 'client': timeout must be a number of sec"):
        lifespan.add_resource("client", lambda: None, timeout=0)
    with pytest.raises(ValueError, match=r"resource 'cache': timeout must be a number of seco"):
        add_generator(lifespan, "cache", [], timeout=-1)

    async def coroutine() -> None:
        pass

    def function() -> None:
        pass

    for not_a_generator in (coroutine, function):
        with pytest.raises(ValueError, match="resource 'bad' must be an async generator function"):
            lifespan.resource("bad")(not_a_generator)  # type: ignore[arg-type]


def test_a_framework_lifespan_starts_again_after_a_shutdown() -> None:
    """One module-level app, a TestClient per test: every cycle opens fresh resources."""
    lifespan = Lifespan()
    events: list[str] = []

    @lifespan.resource("connection")
    async def connection() -> AsyncIterator[dict[str, bool]]:
        value = {"closed": False}
        events.append("open")
        yield value
        value["closed"] = True
        events.append("close")

    async def use(request: Request) -> JSONResponse:
        return JSONResponse(request.state.connection)

    app = Starlette(routes=[Route("/use", use)], lifespan=lifespan)
    for _ in range(2):
        with TestClient(app) as client:
            assert client.get("/use").json() == {"closed": False}
            assert lifespan.state == "ready"
    assert events == ["open", "close", "open", "close"]


@pytest.mark.anyio
async def test_a_blocked_sync_check_is_not_run_again_in_new_threads() -> None:
    release = threading.Event()
    lifespan = Lifespan()
    lifespan.add_check("blocked", lambda: release.wait(10), timeout=0.05)
    try:
        first = await lifespan.run_checks()
        assert lifespan.blocked_checks == {"blocked": 1}
        before = threading.active_count()
        later = [await lifespan.run_checks() for _ in range(20)]
        assert threading.active_count() == before  # no thread per probe
        assert first["blocked"].error == "timed out after 0.05s"
        assert {r["blocked"].error for r in later} == {
            "still blocked since an earlier run timed out"
        }
        assert all(r["blocked"].outcome == "timeout" for r in later)
    finally:
        release.set()
    with anyio.fail_after(5):
        while lifespan.blocked_checks:  # noqa: ASYNC110 - a thread, no event to wait on
            await anyio.sleep(0.01)
    assert (await lifespan.run_checks())["blocked"].ok


@pytest.mark.anyio
async def test_two_running_stacks_share_one_startup_and_one_shutdown() -> None:
    lifespan = Lifespan()
    events: list[str] = []

    @lifespan.resource("db")
    async def db() -> AsyncIterator[str]:
        events.append("open")
        yield "db"
        events.append("close")

    first = resilient(Starlette(), lifespan=lifespan, environ={})
    second = resilient(Starlette(), lifespan=lifespan, environ={})
    async with LifespanManager(first):
        async with LifespanManager(second):
            assert lifespan.users == 2 and lifespan.state == "ready"
        assert events == ["open"]  # the second stack stopped first: nothing closed yet
    assert events == ["open", "close"]
    assert lifespan.users == 0 and str(lifespan.state) == "stopped"


@pytest.mark.anyio
async def test_a_sync_check_blocked_once_is_retried_at_startup() -> None:
    release = threading.Event()
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 1:
            release.wait(5)  # the first attempt hangs past its timeout

    lifespan = Lifespan()
    lifespan.add_check("slow-then-ok", check, timeout=0.1, attempts=3)
    try:
        await lifespan.startup()
        assert lifespan.startup_results["slow-then-ok"].ok
        assert len(calls) == 2
    finally:
        release.set()
        await lifespan.shutdown()


@pytest.mark.anyio
async def test_overlapping_runs_of_a_slow_healthy_check_both_pass() -> None:
    lifespan = Lifespan()
    lifespan.add_check("slow", lambda: sleep(0.05), timeout=2)
    results: list[bool] = []

    async def run() -> None:
        results.append((await lifespan.run_checks())["slow"].ok)

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        group.start_soon(run)
    assert results == [True, True]


@pytest.mark.anyio
async def test_a_cancelled_startup_closes_what_it_opened() -> None:
    lifespan = Lifespan()
    events: list[str] = []

    @lifespan.resource("pool")
    async def pool() -> AsyncIterator[str]:
        events.append("open")
        yield "pool"
        events.append("close")

    @lifespan.check("hang", timeout=10)
    async def hang() -> None:
        await anyio.sleep(10)

    with anyio.move_on_after(0.2):
        await lifespan.startup()
    assert events == ["open", "close"]
    assert str(lifespan.state) == "failed"


@pytest.mark.anyio
async def test_status_sections_may_be_awaitables_from_sync_callables() -> None:
    lifespan = Lifespan()

    async def stats() -> dict[str, int]:
        return {"size": 5}

    lifespan.add_status("pool", lambda: stats())
    assert (await lifespan.status())["pool"] == {"size": 5}
