"""``asgi-resilience run --management-port``: the operational endpoints on their own port under
a real server, one worker or two (their metrics merged), the port free after the exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, metric_total, start_command

CLI = [sys.executable, "-m", "asgi_resilience.cli"]
DURATION_COUNT = "http_server_request_duration_seconds_count"
FRESH_CONNECTIONS = httpx.Limits(max_keepalive_connections=0)  # the kernel spreads them


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(url: str, seconds: float = 15) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # another process: nothing to wait on but its answers


@pytest.mark.parametrize("workers", [1, 2])
def test_run_serves_the_operational_endpoints_on_the_management_port_only(
    workers: int, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    management = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ASGI_RESILIENCE_", "_ASGI"))},
        "ASGI_RESILIENCE_HEALTH_STATUS_DETAILS": "true",
        "ASGI_RESILIENCE_MANAGEMENT_HOST": "127.0.0.1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [*CLI, "run", "tests.apps.metered:app", "--workers", str(workers)]
    server = start_command(
        lambda port: [*command, "--port", str(port), "--management-port", str(management)],
        env=env,
        log=tmp_path / "server.log",
        started=processes,
    )
    operational = f"http://127.0.0.1:{management}"
    assert wait_for(operational + "/health/live").status_code == 200
    with httpx.Client(base_url=server.base_url, limits=FRESH_CONNECTIONS, timeout=10) as app:
        pids = {app.get("/pid").text for _ in range(20)}
        for path in ("/metrics", "/health/status"):
            assert app.get(path).status_code == 404, path
        assert app.post("/health/drain").status_code == 404
        for path in ("/health/live", "/health/ready"):
            assert app.get(path).status_code == 200, path
    with httpx.Client(base_url=operational, limits=FRESH_CONNECTIONS, timeout=10) as client:
        scrapes = [client.get("/metrics") for _ in range(8)]
        assert client.get("/health/status").json()["ready"] is True
        assert client.get("/health/ready").status_code == 200
        assert client.post("/metrics").status_code == 405
    assert len(pids) == workers, server.output()  # both workers served requests
    # Whichever worker answered the scrape, it counted every worker's requests.
    counted = [metric_total(s.text, DURATION_COUNT, route="/pid") for s in scrapes]
    assert counted == [20.0] * 8, (counted, server.output())
    assert server.stop(20) == 0, server.output()
    assert port_is_free(management)
    assert "Running on" not in server.output().split("Uvicorn running on", 1)[0]
