"""The stack under a real uvicorn process: startup failure exit codes and SIGTERM draining."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn(app: str, port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--no-access-log"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until_ready(base_url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{process.communicate()[0]}")
        time.sleep(0.05)
    raise RuntimeError("server did not become ready")


@pytest.fixture
def events_file(tmp_path: Path) -> Path:
    return tmp_path / "events.log"


@pytest.fixture
def stop_later() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        if process.stdout is not None:
            process.stdout.close()


def test_failing_critical_check_makes_uvicorn_exit_non_zero(
    events_file: Path, stop_later: list[subprocess.Popen[str]]
) -> None:
    process = uvicorn("tests.apps.served:failing", free_port(), {"EVENTS_FILE": str(events_file)})
    stop_later.append(process)
    output, _ = process.communicate(timeout=20)
    assert process.returncode != 0
    assert "check 'payments-api' failed" in output
    assert "ConnectionRefusedError: payments-api refused the connection" in output


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the client side only; any loop will do
async def test_sigterm_drains_in_flight_requests_before_resources_close(
    events_file: Path, stop_later: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {"EVENTS_FILE": str(events_file), "SLOW_SECONDS": "2.0", "DRAIN_DELAY": "0.5"}
    process = uvicorn("tests.apps.served:draining", port, env)
    stop_later.append(process)
    wait_until_ready(base_url, process)
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
    output, _ = process.communicate(timeout=20)
    assert process.returncode in (0, -signal.SIGTERM), output
    text = await anyio.Path(events_file).read_text()
    events = [line.split(" ", 1) for line in text.splitlines()]
    names = [name for _, name in events]
    assert names.count("request-end") == 50
    last_request_end = max(float(t) for t, name in events if name == "request-end")
    [(closed_at, closed)] = [(float(t), n) for t, n in events if n.startswith("resource-close")]
    assert closed == "resource-close in_flight=0"
    assert closed_at > last_request_end
