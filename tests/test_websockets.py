"""WebSocket sessions through ``resilient()``: request ids, metrics, draining."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from asgi_resilience import Lifespan, WebSocketMiddleware, resilient
from asgi_resilience.types import Message
from tests.apps.sessions import echo
from tests.servers import start_uvicorn, wait_until_ready


def echo_app() -> Starlette:
    return Starlette(routes=[WebSocketRoute("/ws/{room}", echo)])


def gauge(registry: CollectorRegistry, route: str = "/ws/{room}") -> float | None:
    return registry.get_sample_value("asgi_resilience_websocket_sessions_active", {"route": route})


def sessions_counted(registry: CollectorRegistry, route: str = "/ws/{room}") -> float | None:
    return registry.get_sample_value(
        "asgi_resilience_websocket_session_duration_seconds_count", {"route": route}
    )


# -- in process ------------------------------------------------------------------------------


def test_the_handler_sees_the_upgrade_requests_id_and_the_accept_echoes_it() -> None:
    registry = CollectorRegistry()
    app = resilient(echo_app(), registry=registry)
    with TestClient(app) as client:
        with client.websocket_connect("/ws/1", headers={"x-request-id": "ws-42"}) as session:
            assert session.receive_text() == "id ws-42"
            assert (b"x-request-id", b"ws-42") in (session.extra_headers or [])
            session.send_text("hello")
            assert session.receive_text() == "hello"
            assert gauge(registry) == 1
        with client.websocket_connect("/ws/2") as session:
            generated = session.receive_text().removeprefix("id ")
            assert len(generated) == 32 and int(generated, 16) >= 0
        with client.websocket_connect("/ws/3", headers={"x-request-id": "bad id"}) as session:
            assert session.receive_text() != "id bad id"  # replaced, as for HTTP
    assert gauge(registry) == 0
    assert sessions_counted(registry) == 3


def test_an_invalid_id_refuses_the_session_when_the_stack_rejects_them() -> None:
    from starlette.websockets import WebSocketDisconnect as Refused

    app = resilient(echo_app(), registry=CollectorRegistry())
    app.stack.websocket_app.request_ids.reject_invalid = True  # type: ignore[attr-defined]
    with TestClient(app) as client:
        with (
            pytest.raises(Refused),
            client.websocket_connect("/ws/1", headers={"x-request-id": "bad id"}) as session,
        ):
            session.receive_text()


def test_rate_limits_and_the_error_layer_leave_websockets_alone() -> None:
    registry = CollectorRegistry()
    app = resilient(echo_app(), registry=registry, rate_limit="1/minute")
    with TestClient(app) as client:
        for room in range(3):  # over the limit: not counted against it
            with client.websocket_connect(f"/ws/{room}") as session:
                assert session.receive_text().startswith("id ")
        assert client.get("/nothing").status_code == 404
        assert client.get("/nothing").status_code == 429  # HTTP is limited


def test_the_middleware_takes_only_its_kinds() -> None:
    with pytest.raises(ValueError, match="lifespan must be a Lifespan or None"):
        WebSocketMiddleware(echo_app(), lifespan="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request_ids must be a RequestIdMiddleware"):
        WebSocketMiddleware(echo_app(), request_ids=object())  # type: ignore[arg-type]


class Client:
    """The server side of one WebSocket connection, driven by hand."""

    def __init__(self, path: str = "/ws/1") -> None:
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "scheme": "ws",
            "subprotocols": [],
        }
        self.to_app, self.inbox = anyio.create_memory_object_stream[Message](10)
        self.sent: list[Message] = []
        self.got = anyio.Event()
        self.to_app.send_nowait({"type": "websocket.connect"})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.to_app.close()
        self.inbox.close()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.got.set()
        self.got = anyio.Event()

    async def wait_for(self, kind: str) -> Message:
        with anyio.fail_after(2):
            while True:
                for message in self.sent:
                    if message["type"] == kind:
                        return message
                await self.got.wait()


@pytest.mark.anyio
async def test_a_drain_refuses_new_sessions_and_closes_open_ones_with_1001() -> None:
    registry = CollectorRegistry()
    lifespan = Lifespan(registry=registry)
    app = resilient(echo_app(), lifespan=lifespan, registry=registry)
    await lifespan.startup()
    try:
        with Client() as open_session, Client("/ws/2") as late:
            async with anyio.create_task_group() as group:
                group.start_soon(
                    app, open_session.scope, open_session.inbox.receive, open_session.send
                )
                await open_session.wait_for("websocket.accept")
                assert lifespan.in_flight == 1  # a session is in flight for the drain
                lifespan.begin_drain()

                await app(late.scope, late.inbox.receive, late.send)
                assert [m["type"] for m in late.sent] == ["websocket.close"]  # before any accept

                lifespan.go_away()  # the drain delay ended
                closed = await open_session.wait_for("websocket.close")
                assert closed["code"] == 1001
                # The server delivers the client's answer to the close; the handler ends.
                open_session.to_app.send_nowait({"type": "websocket.disconnect", "code": 1001})
        assert lifespan.in_flight == 0
        assert gauge(registry) == 0
        assert sessions_counted(registry) == 1
    finally:
        await lifespan.shutdown()


@pytest.mark.anyio
async def test_a_shutdown_without_a_drain_closes_open_sessions_too() -> None:
    lifespan = Lifespan(registry=CollectorRegistry())
    app = resilient(echo_app(), lifespan=lifespan, registry=CollectorRegistry())
    await lifespan.startup()
    with Client() as session:
        async with anyio.create_task_group() as group:
            group.start_soon(app, session.scope, session.inbox.receive, session.send)
            await session.wait_for("websocket.accept")

            async def client_answers_the_close() -> None:
                await session.wait_for("websocket.close")
                session.to_app.send_nowait({"type": "websocket.disconnect", "code": 1001})

            group.start_soon(client_answers_the_close)
            with anyio.fail_after(3):
                await lifespan.shutdown()  # waits for the session, which the close ends
    assert (await session.wait_for("websocket.close"))["code"] == 1001
    assert lifespan.in_flight == 0


# -- a real server ---------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_RESILIENCE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    started = start_uvicorn(
        "tests.apps.sessions:app", log=tmp_path / "server.log", env={**env, "DRAIN_DELAY": "1"}
    )
    try:
        wait_until_ready(started.base_url, started.process, output=started.output)
        yield started
    finally:
        started.kill()


def test_under_uvicorn_a_drain_refuses_new_sessions_and_closes_open_ones_first(server: Any) -> None:
    ws_url = f"ws://127.0.0.1:{server.port}/ws/lobby"
    with connect(ws_url, additional_headers={"X-Request-ID": "ws-upgrade-1"}) as session:
        assert session.response is not None
        assert session.response.headers["x-request-id"] == "ws-upgrade-1"
        assert session.recv(timeout=5) == "id ws-upgrade-1"
        metrics = httpx.get(server.base_url + "/metrics").text
        assert 'asgi_resilience_websocket_sessions_active{route="/ws/{room}"} 1.0' in metrics

        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert httpx.get(server.base_url + "/health/ready", timeout=2).status_code == 503
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url, open_timeout=2)
        assert refused.value.response.status_code == 403
        session.send("still here")
        assert session.recv(timeout=2) == "still here"  # served during the drain delay

        closed = threading.Event()
        codes: list[int | None] = []

        def wait_for_close() -> None:
            try:
                session.recv(timeout=5)
            except ConnectionClosed as exc:
                codes.append(exc.rcvd.code if exc.rcvd else None)
                closed.set()

        waiter = threading.Thread(target=wait_for_close)
        waiter.start()
        waiter.join(6)
        took = time.monotonic() - sent
    assert codes == [1001]
    assert 0.9 <= took < 2.5  # at the end of the one-second drain delay
    assert server.process.wait(10) == -signal.SIGTERM
    assert "1012" not in server.output()  # not cut by uvicorn's own shutdown


async def ticker(websocket: WebSocket) -> None:
    """Only sends, never receives: a feed."""
    await websocket.accept()
    try:
        while True:
            await websocket.send_text("tick")
            await anyio.sleep(0.01)
    except WebSocketDisconnect:
        pass


@pytest.mark.anyio
async def test_a_handler_that_only_sends_ends_once_its_session_went_away() -> None:
    lifespan = Lifespan(registry=CollectorRegistry())
    app = resilient(
        Starlette(routes=[WebSocketRoute("/ws/{room}", ticker)]),
        lifespan=lifespan,
        registry=CollectorRegistry(),
    )
    await lifespan.startup()
    with Client() as session:
        async with anyio.create_task_group() as group:
            group.start_soon(app, session.scope, session.inbox.receive, session.send)
            await session.wait_for("websocket.accept")
            lifespan.go_away()
            with anyio.fail_after(2):  # its next send tells it: the handler returns
                await lifespan.shutdown()
    assert [m["type"] for m in session.sent].count("websocket.close") == 1
    assert lifespan.in_flight == 0


@pytest.mark.anyio
async def test_a_raising_handler_raises_its_own_exception_and_a_left_session_is_not_closed() -> (
    None
):
    async def failing(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        raise KeyError("boom")

    async def lingering(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            await websocket.receive_text()
        except WebSocketDisconnect:
            await anyio.sleep(0.02)  # cleaning up after the client left

    lifespan = Lifespan(registry=CollectorRegistry())
    app = resilient(
        Starlette(routes=[WebSocketRoute("/fail", failing), WebSocketRoute("/linger", lingering)]),
        lifespan=lifespan,
        registry=CollectorRegistry(),
    )
    await lifespan.startup()
    try:
        with Client("/fail") as session:
            session.to_app.send_nowait({"type": "websocket.receive", "text": "hi"})
            with pytest.raises(KeyError):  # itself, not an ExceptionGroup
                await app(session.scope, session.inbox.receive, session.send)
        with Client("/linger") as session:
            session.to_app.send_nowait({"type": "websocket.disconnect", "code": 1000})
            async with anyio.create_task_group() as group:
                group.start_soon(app, session.scope, session.inbox.receive, session.send)
                await session.wait_for("websocket.accept")
                lifespan.go_away()  # the drain ends while the handler cleans up
            assert [m["type"] for m in session.sent] == ["websocket.accept"]  # no close after
    finally:
        await lifespan.shutdown()
