"""``management_port``: the operational endpoints on a listener of their own, opened and closed
with the lifespan, 404 on the application's port."""

from __future__ import annotations

import logging
import socket
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_resilience import ConfigurationError, Lifespan, StartupError, resilient
from asgi_resilience.stack import ResilientApp
from tests.asgi import client_for
from tests.servers import free_port

pytestmark = pytest.mark.anyio


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def service(port: int, **options: Any) -> ResilientApp:
    lifespan = Lifespan(drain_delay=0)
    lifespan.add_check("database", _ok)
    return resilient(
        Starlette(routes=[Route("/", hello)]),
        environ={},
        registry=CollectorRegistry(),
        lifespan=lifespan,
        health_status_details=True,
        management_port=port,
        management_host="127.0.0.1",
        **options,
    )


async def _ok() -> None:
    pass


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_operational_endpoints_move_to_the_management_port() -> None:
    port = free_port()
    app = service(port)
    async with LifespanManager(app), client_for(app) as public:
        assert app.management is not None and app.management.address == ("127.0.0.1", port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as management:
            assert (await public.get("/")).text == "hello"
            for path in ("/metrics", "/health/status"):
                assert (await management.get(path)).status_code == 200, path
                on_the_app = await public.get(path)
                assert on_the_app.status_code == 404, path
                assert on_the_app.headers["content-type"] == "application/problem+json"
            assert (await public.post("/health/drain")).status_code == 404
            for path in ("/health/live", "/health/ready", "/livez", "/readyz"):
                assert (await management.get(path)).status_code == 200, path
                assert (await public.get(path)).status_code == 200, path
            status = (await management.get("/health/status")).json()
            assert status["checks"]["database"]["status"] == "up"
            assert status["resources"] == ["management-listener"]
            assert (
                b"http_server_request_duration_seconds"
                in (await management.get("/metrics")).content
            )
            assert (await management.get("/anything")).status_code == 404
    assert app.management.address is None
    assert port_is_free(port)  # closed with the lifespan


async def test_concurrent_scrapes_and_probes_on_the_management_port() -> None:
    port = free_port()
    app = service(port, access_log=False)
    statuses: list[int] = []
    async with LifespanManager(app):
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:

            async def one(path: str) -> None:
                statuses.append((await client.get(path)).status_code)

            async with anyio.create_task_group() as group:
                for n in range(150):
                    group.start_soon(one, ("/metrics", "/health/ready", "/health/status")[n % 3])
    assert statuses == [200] * 150


async def test_the_allow_list_applies_on_the_management_port_too() -> None:
    port = free_port()
    app = service(port, operational_allow=["10.0.0.0/8"])
    async with LifespanManager(app):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/metrics")).status_code == 404  # 127.0.0.1 is not allowed
            assert (await client.get("/health/live")).status_code == 200


async def test_a_port_in_use_fails_the_startup_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        app = service(port)
        with pytest.raises(StartupError, match=f"management_port {port} on 127.0.0.1"):
            await app.lifespan.startup()
        assert app.lifespan.state == "failed"


async def test_a_management_port_of_zero_takes_any_free_port_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = service(0)
    with caplog.at_level(logging.INFO, logger="asgi_resilience.management"):
        async with LifespanManager(app):
            assert app.management is not None and app.management.address is not None
            host, port = app.management.address
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://{host}:{port}/health/live")
            assert response.status_code == 200
    assert f"Management endpoints on http://127.0.0.1:{port}" in caplog.text
    assert "Running on" not in caplog.text  # the server's own announcement stays quiet


def test_options_are_checked_and_come_from_the_environment() -> None:
    with pytest.raises(ValueError, match="management_port must be a port number"):
        resilient(Starlette(), environ={}, management_port=70000)
    with pytest.raises(ValueError, match="management_host must be an address"):
        resilient(Starlette(), environ={}, management_port=9090, management_host="")
    app = resilient(
        Starlette(),
        environ={
            "ASGI_RESILIENCE_MANAGEMENT_PORT": "9090",
            "ASGI_RESILIENCE_MANAGEMENT_HOST": "::",
        },
    )
    assert (app.options.management_port, app.options.management_host) == (9090, "::")
    with pytest.raises(ConfigurationError, match="ASGI_RESILIENCE_MANAGEMENT_PORT='http'"):
        resilient(Starlette(), environ={"ASGI_RESILIENCE_MANAGEMENT_PORT": "http"})


async def test_a_trial_startup_binds_no_port() -> None:
    # asgi-resilience check beside the running service: its management port is taken.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        app = service(taken.getsockname()[1])
        await app.lifespan.trial_startup()
    assert app.lifespan.startup_results["database"].ok
    assert app.management is not None and app.management.address is None
    assert app.lifespan.trial is False


async def test_the_drain_command_finds_the_management_port_by_itself(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from asgi_resilience import cli

    port = free_port()
    app = service(port)
    monkeypatch.setenv("ASGI_RESILIENCE_MANAGEMENT_PORT", str(port))
    async with LifespanManager(app):
        code = await anyio.to_thread.run_sync(cli.drain, None, 10.0)
        assert app.lifespan.state == "draining"
    assert code == 0
    assert capsys.readouterr().out.startswith("drained: draining")


@pytest.mark.parametrize("host", ["999.1.1.1", "[::1]", "127.0.0.1:9090", "a host", "-x"])
def test_a_management_host_that_is_no_address_is_refused_when_built(host: str) -> None:
    with pytest.raises(ValueError, match="management_host must be an address to listen on"):
        resilient(Starlette(), environ={}, management_port=9090, management_host=host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "localhost", "mgmt.internal"])
def test_addresses_and_host_names_are_taken(host: str) -> None:
    app = resilient(Starlette(), environ={}, management_port=9090, management_host=host)
    assert app.options.management_host == host


def test_without_hypercorn_the_app_is_refused_when_built_naming_the_extra() -> None:
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['hypercorn'] = None\n"
        "from starlette.applications import Starlette\n"
        "from asgi_resilience import resilient\n"
        "resilient(Starlette(), environ={}, management_port=9090)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "asgi_resilience.exceptions.MissingExtra: management_port needs hypercorn: "
        "pip install 'asgi-resilience[server]'"
    )
