from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from asgi_resilience import ResilientApp, demo
from asgi_resilience.demo import create_app, main

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def demo_server() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``python -m asgi_resilience.demo`` on a free loopback port; stopped afterwards."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "asgi_resilience.demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "APP_ENV": "production"},
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                httpx.get(f"{base_url}/items/1", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the demo server did not start") from None
                time.sleep(0.05)
        yield base_url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_demo_serves_over_http_and_stops_on_sigterm(
    demo_server: tuple[str, subprocess.Popen[str]],
) -> None:
    base_url, process = demo_server
    with httpx.Client(base_url=base_url, timeout=10) as client:
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
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=10)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Finished server process" in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "asgi_resilience.access"][1:]
    assert [line["status"] for line in access] == [200, 404, 500, 200, 200]
    assert access[0]["request_id"] == "demo-req-1"  # after the fixture's readiness probe
    assert access[0]["route"] == "/items/{item_id}"
    errors = [line for line in lines if line["logger"] == "asgi_resilience.errors"]
    assert len(errors) == 1 and "hunter2" in errors[0]["exc_info"]


async def test_demo_routes_in_process() -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app()), base_url="http://testserver"
    ) as client:
        item = await client.get("/items/3")
        missing = await client.get("/items/7")
        boom = await client.get("/boom")
        stream = await client.get("/stream")
        slow = await client.get("/slow", params={"seconds": "0.01"})
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


def test_main_without_uvicorn_exits_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "pip install 'asgi-resilience[server]'" in capsys.readouterr().err


async def test_slow_rejects_bad_durations() -> None:
    app = create_app()
    assert isinstance(app, ResilientApp)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        for value in ("abc", "-1", "11"):
            response = await client.get("/slow", params={"seconds": value})
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "bad_request"


def test_main_runs_uvicorn_with_the_wrapped_app(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls: list[tuple[object, dict[str, object]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.setattr(demo, "configure_logging", lambda: None)
    main(["--port", "8123"])
    [(app, options)] = calls
    assert isinstance(app, ResilientApp)
    assert options["port"] == 8123 and options["host"] == "127.0.0.1"


def test_configure_logging_writes_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        demo.configure_logging()
        logging.getLogger("tests.demo").info("hello %s", "there")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["message"] == "hello there" and line["request_id"] == "-"
