"""Background work under real processes: uvicorn with SIGTERM, ``asgi-resilience worker``,
``Lifespan.serve``, a close that hangs shielded, a fault that asks for a shutdown.

The app is tests/apps/workers.py; it appends ``<monotonic> <event>`` lines to ``EVENTS_FILE``
(CLOCK_MONOTONIC is one clock for every process of the machine, so the test's own readings
compare with the app's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import ROOT, free_port, start_command, start_uvicorn, wait_until_ready

APP = "tests.apps.workers"
CLI = [sys.executable, "-m", "asgi_resilience.cli"]


def events(path: Path) -> list[tuple[float, str]]:
    return [
        (float(at), event)
        for at, event in (line.split(" ", 1) for line in path.read_text().splitlines())
    ]


def names(path: Path) -> list[str]:
    return [event for _, event in events(path) if event != "check passed"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_RESILIENCE_")}
    variables.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return {**variables, "EVENTS_FILE": str(tmp_path / "events.txt")}


def json_lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_sigterm_drains_then_stops_tasks_then_closes_resources_in_reverse(
    tmp_path: Path, env: dict[str, str]
) -> None:
    env["DRAIN_DELAY"] = "0.5"
    server = start_uvicorn(f"{APP}:api", log=tmp_path / "server.log", env=env)
    try:
        wait_until_ready(server.base_url, server.process, output=server.output)
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            answers: list[int] = []
            slow = threading.Thread(
                target=lambda: answers.append(client.get("/slow?seconds=0.8").status_code)
            )
            slow.start()
            time.sleep(0.2)  # the request is in flight (another process: no event to wait on)
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            assert client.get("/health/ready").status_code == 503  # draining, still serving
            slow.join(10)
        code = server.process.wait(10)
    finally:
        server.kill()
    assert answers == [200]
    assert code == -signal.SIGTERM  # uvicorn re-raises the signal once it has stopped
    recorded = events(Path(env["EVENTS_FILE"]))
    drain_at = next(at for at, event in recorded if event == "drain")
    assert drain_at - sent < 0.1
    assert names(Path(env["EVENTS_FILE"])) == [
        "app startup",
        "task started",
        "request start",
        "drain",
        "request end",
        "task cancelled, store open=True",
        "app shutdown",
        "close store",
        "close early",
    ]


def test_asgi_resilience_worker_serves_probes_and_metrics_and_stops_cleanly(
    tmp_path: Path, env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "worker.log"
    server = start_command(
        lambda port: [*CLI, "worker", f"{APP}:lifespan", "--port", str(port)],
        env=env,
        log=log,
        started=processes,
    )
    with httpx.Client(base_url=server.base_url, timeout=5) as client:
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"]["broker"]["status"] == "up"
        metrics = client.get("/metrics").text
        assert 'asgi_resilience_task_up{task="consumer"} 1.0' in metrics
        assert 'asgi_resilience_task_up{task="sweeper"} 1.0' in metrics
        missing = client.get("/anything")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
    assert server.stop() == 0
    assert names(Path(env["EVENTS_FILE"])) == [
        "task started",
        "drain",
        "task cancelled, store open=True",
        "close store",
        "close early",
    ]
    messages = [str(r["message"]) for r in json_lines(server.output())]
    assert any(m.startswith("Tasks stopped: consumer stopped") for m in messages)
    assert "Shutdown: store ok" in "\n".join(messages)


def test_a_worker_whose_critical_check_fails_exits_3_and_never_listens(
    tmp_path: Path, env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    env["FAIL_CHECK"] = "1"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*CLI, "worker", f"{APP}:lifespan", "--port", str(free_port())],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    processes.append(process)
    assert process.wait(30) == 3
    output = log.read_text()
    assert "startup failed: check 'broker' failed: ConnectionError: broker unreachable" in output
    assert "Uvicorn running" not in output
    # No task ran; what had been opened before the check failed was closed.
    assert names(Path(env["EVENTS_FILE"])) == ["close store", "close early"]


def test_lifespan_serve_does_the_same_from_python(
    tmp_path: Path, env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "serve.log"
    server = start_command(
        lambda port: [
            sys.executable,
            "-c",
            f"from {APP} import lifespan; lifespan.serve(port={port}); print('served')",
        ],
        env=env,
        log=log,
        started=processes,
    )
    with httpx.Client(base_url=server.base_url, timeout=5) as client:
        assert client.get("/health/live").status_code == 200
        assert 'asgi_resilience_task_up{task="consumer"} 1.0' in client.get("/metrics").text
    assert server.stop() == 0
    assert log.read_text().rstrip().endswith("served")  # serve() returned after the stop
    assert names(Path(env["EVENTS_FILE"]))[-2:] == ["close store", "close early"]


@pytest.mark.parametrize("runner", ["uvicorn", "asgi-resilience run"])
def test_a_close_that_hangs_shielded_cannot_hold_the_process_past_the_shutdown_timeout(
    runner: str, tmp_path: Path, env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    env.update(HANG_CLOSE="1", SHUTDOWN_TIMEOUT="3")
    log = tmp_path / "server.log"
    if runner == "uvicorn":
        server = start_uvicorn(f"{APP}:api", log=log, env=env)
        processes.append(server.process)
        wait_until_ready(server.base_url, server.process, output=server.output)
    else:
        server = start_command(
            lambda port: [*CLI, "run", f"{APP}:api", "--port", str(port)],
            env=env,
            log=log,
            started=processes,
        )
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(10)
    took = time.monotonic() - sent
    assert took < 4, f"exited {took:.2f}s after SIGTERM"
    assert names(Path(env["EVENTS_FILE"])) == [
        "app startup",
        "task started",
        "drain",
        "task cancelled, store open=True",
        "app shutdown",
        "close store",
        "close stuck: hanging",
        "close early",  # registered before the stuck one: still closed
    ]
    output = log.read_text()
    if runner == "uvicorn":
        # uvicorn re-raises SIGTERM when its shutdown is done: the process ends by the signal
        # before the event loop would wait for the abandoned close.
        assert code == -signal.SIGTERM
        [report] = [line for line in output.splitlines() if line.startswith("Shutdown:")]
        assert report.startswith("Shutdown: store ok")
        assert report.endswith("; abandoned (still running): stuck")
    else:
        # The event loop waits for every task at its end: the abandoned close would hold it
        # forever, so the lifespan leaves with status 1 and says why.
        assert code == 1
        messages = [str(r["message"]) for r in json_lines(output)]
        [report] = [m for m in messages if m.startswith("Shutdown:")]
        assert report.endswith("; abandoned (still running): stuck")
        assert "stuck timeout" in report
        assert any(
            m == "Exiting now: stuck still running after the shutdown (abandoned); status 1"
            for m in messages
        )


def test_on_unhandled_shutdown_stops_the_service_gracefully_after_a_thread_dies(
    tmp_path: Path, env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    env.update(ON_UNHANDLED="shutdown", DRAIN_DELAY="0.3")
    log = tmp_path / "server.log"
    server = start_command(
        lambda port: [*CLI, "run", f"{APP}:api", "--port", str(port)],
        env=env,
        log=log,
        started=processes,
    )
    assert httpx.get(server.base_url + "/thread-crash", timeout=5).text == "started"
    assert server.process.wait(10) == 0  # a graceful stop, as after SIGTERM
    assert names(Path(env["EVENTS_FILE"]))[2:] == [
        "drain",
        "task cancelled, store open=True",
        "app shutdown",
        "close store",
        "close early",
    ]
    records = json_lines(log.read_text())
    [fault] = [r for r in records if str(r["message"]).startswith("Unhandled exception")]
    assert fault["message"] == (
        "Unhandled exception in thread 'poller': ZeroDivisionError: division by zero; "
        "shutting down (on_unhandled='shutdown')"
    )
    assert fault["source"] == "thread"
    assert "ZeroDivisionError: division by zero" in str(fault["exc_info"])  # the traceback
