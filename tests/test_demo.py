from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from asgi_resilience.demo import create_app, main
from tests.asgi import client_for
from tests.servers import ServerProcess, start_on_a_free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """``python -m asgi_resilience.demo`` on a free loopback port; stopped afterwards."""
    log = tmp_path / "demo.log"

    def on(port: int) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "asgi_resilience.demo", "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "APP_ENV": "production"},
            )

    server = ServerProcess(*start_on_a_free_port(on, log.read_text), log)
    try:
        yield server
    finally:
        server.kill()


def test_demo_serves_over_http_and_stops_on_sigterm(demo_server: ServerProcess) -> None:
    server = demo_server
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        item = client.get("/items/2", headers={"X-Request-ID": "demo-req-1"})
        missing = client.get("/items/99")
        boom = client.get("/boom")
        stream = client.get("/stream")
        slow = client.get("/slow", params={"seconds": "0"})
    assert item.headers["x-request-id"] == "demo-req-1"
    assert item.json()["data"] == {"id": 2, "name": "rocket skates"}
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "item_not_found"
    assert boom.status_code == 500
    assert "hunter2" not in boom.text
    assert stream.json()["data"][0] == {"id": 1, "name": "anvil"}
    assert stream.json()["meta"]["count"] == 3
    assert slow.json()["data"] == {"slept": 0.0}
    returncode = server.stop(timeout=10)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert returncode in (0, -signal.SIGTERM)
    output = server.output()
    assert "Finished server process" in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "asgi_resilience.access"]
    assert [line["status"] for line in access] == [200, 404, 500, 200, 200]
    assert access[0]["request_id"] == "demo-req-1"
    assert access[0]["route"] == "/items/{item_id}"
    errors = [line for line in lines if line["logger"] == "asgi_resilience.errors"]
    assert len(errors) == 1 and "hunter2" in errors[0]["exc_info"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiosqlite needs asyncio
async def test_demo_routes_in_process(tmp_path: Path) -> None:
    app = create_app(f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}")
    async with (
        LifespanManager(app) as manager,
        client_for(manager.app) as client,
    ):
        item = await client.get("/items/3")
        missing = await client.get("/items/7")
        boom = await client.get("/boom")
        stream = await client.get("/stream")
        slow = await client.get("/slow", params={"seconds": "0.01"})
        bad = [await client.get("/slow", params={"seconds": v}) for v in ("abc", "-1", "11")]
        status = await client.get("/health/status")
    assert item.json()["data"] == {"id": 3, "name": "giant magnet"}
    assert missing.json()["error"] == {
        "code": "item_not_found",
        "message": "No item 7",
        "status": 404,
        "details": None,
    }
    assert boom.status_code == 500 and "hunter2" not in boom.text
    assert [entry["id"] for entry in stream.json()["data"]] == [1, 2, 3]
    assert slow.json()["data"] == {"slept": 0.01}
    assert [r.status_code for r in bad] == [400, 400, 400]
    assert status.json()["sqlite"]["pool"] is not None
    assert item.headers["x-ratelimit-limit"] == "50"


def test_python_m_demo_runs_the_cli_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    from asgi_resilience import cli

    calls: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        calls.append(list(argv))
        return 0

    monkeypatch.setattr(cli, "main", fake_main)
    with pytest.raises(SystemExit) as exited:
        main(["--port", "8123"])
    assert exited.value.code == 0
    assert calls == [["demo", "--host", "127.0.0.1", "--port", "8123"]]
