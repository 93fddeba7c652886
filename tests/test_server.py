"""The stack under a real uvicorn process: startup failure exit codes and SIGTERM draining."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.servers import ServerProcess, start_uvicorn, uvicorn, wait_until_ready


@pytest.fixture
def events_file(tmp_path: Path) -> Path:
    return tmp_path / "events.log"


@pytest.fixture
def stop_later() -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        server.kill()


def test_failing_critical_check_makes_uvicorn_exit_non_zero(
    events_file: Path, tmp_path: Path
) -> None:
    log = tmp_path / "uvicorn.log"
    env = {"EVENTS_FILE": str(events_file)}
    process = uvicorn("tests.apps.served:failing", "--no-access-log", log=log, env=env)
    try:
        assert process.wait(20) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    output = log.read_text()
    assert "check 'payments-api' failed" in output
    assert "ConnectionRefusedError: payments-api refused the connection" in output


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the client side only; any loop will do
async def test_sigterm_drains_in_flight_requests_before_resources_close(
    events_file: Path, tmp_path: Path, stop_later: list[ServerProcess]
) -> None:
    env = {"EVENTS_FILE": str(events_file), "SLOW_SECONDS": "2.0", "DRAIN_DELAY": "0.5"}
    server = start_uvicorn(
        "tests.apps.served:draining", "--no-access-log", log=tmp_path / "uvicorn.log", env=env
    )
    stop_later.append(server)
    process, base_url = server.process, server.base_url
    wait_until_ready(base_url, process, output=server.output)
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:

        async def slow_request() -> None:
            statuses.append((await client.get("/slow")).status_code)

        async with anyio.create_task_group() as group:
            for _ in range(50):
                group.start_soon(slow_request)
            with anyio.fail_after(10):
                # Polling another process: no event to wait on.
                while (await client.get("/in-flight")).json()["in_flight"] < 51:  # noqa: ASYNC110
                    await anyio.sleep(0.02)  # 50 slow ones and this probe itself
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while True:
                response = await client.get("/health/ready")
                if response.status_code == 503:
                    break
                assert time.monotonic() - signalled < 2, "readiness never flipped"
            flipped_after = time.monotonic() - signalled
            assert response.json()["status"] == "draining"
            live = await client.get("/health/live")
            assert live.status_code == 200  # still serving new requests while draining
    assert flipped_after < 0.1
    assert statuses == [200] * 50
    returncode = process.wait(20)
    assert returncode in (0, -signal.SIGTERM), server.output()
    text = await anyio.Path(events_file).read_text()
    events = [line.split(" ", 1) for line in text.splitlines()]
    names = [name for _, name in events]
    assert names.count("request-end") == 50
    last_request_end = max(float(t) for t, name in events if name == "request-end")
    [(closed_at, closed)] = [(float(t), n) for t, n in events if n.startswith("resource-close")]
    assert closed == "resource-close in_flight=0"
    assert closed_at > last_request_end
