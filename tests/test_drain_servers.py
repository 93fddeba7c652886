"""SIGTERM draining beyond uvicorn: ``asgi-resilience run --server hypercorn`` and ``--server
granian`` (one worker and two), and ``asgi-resilience drain`` (a preStop hook) against
Hypercorn and Granian started by hand; the loopback-only ``/health/drain`` it calls.

The app is tests/apps/workers.py's ``api`` (a drain delay of one second here): it appends
``<monotonic> <event>`` lines to ``EVENTS_FILE``, comparable with this process's own clock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import pytest

from asgi_resilience import HealthApp, Lifespan
from asgi_resilience.types import Scope
from tests.asgi import call, http_scope
from tests.servers import ServerProcess, start_command

APP = "tests.apps.workers:api"
CLI = [sys.executable, "-m", "asgi_resilience.cli"]


def events(path: Path) -> list[tuple[float, str]]:
    return [
        (float(at), event)
        for at, event in (line.split(" ", 1) for line in path.read_text().splitlines())
    ]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_RESILIENCE_")}
    variables.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return {**variables, "EVENTS_FILE": str(tmp_path / "events.txt"), "DRAIN_DELAY": "1"}


@pytest.fixture
def start(
    tmp_path: Path, env: dict[str, str]
) -> Iterator[Callable[[Callable[[int], list[str]]], ServerProcess]]:
    started: list[subprocess.Popen[bytes]] = []

    def start_server(command: Callable[[int], list[str]]) -> ServerProcess:
        log = tmp_path / f"server-{len(started)}.log"
        return start_command(command, env=env, log=log, started=started)

    yield start_server
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def first_503_after(base_url: str, since: float) -> float:
    """Seconds from ``since`` until ``/health/ready`` first answers 503 (polled every 5 ms)."""
    deadline = time.monotonic() + 3
    with httpx.Client(base_url=base_url, timeout=2) as client:
        while time.monotonic() < deadline:
            if client.get("/health/ready").status_code == 503:
                return time.monotonic() - since
            time.sleep(0.005)  # another process: nothing to wait on but its answers
    raise AssertionError("readiness never failed")


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("server_name", ["hypercorn", "granian"])
def test_run_with_another_server_drains_on_sigterm(
    server_name: str,
    workers: int,
    start: Callable[[Callable[[int], list[str]]], ServerProcess],
    env: dict[str, str],
) -> None:
    server = start(
        lambda port: [
            *CLI,
            "run",
            APP,
            "--server",
            server_name,
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
    )
    for _ in range(6):  # fresh connections: with two workers, both serve some
        assert httpx.get(server.base_url + "/slow?seconds=0.01").status_code == 200
    metrics = httpx.get(server.base_url + "/metrics").text  # every worker's, merged
    assert 'route="/slow",status_code="200"} 6.0' in metrics
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=server.base_url, timeout=10) as c:
        in_flight = pool.submit(c.get, "/slow", params={"seconds": "1.5"})
        time.sleep(0.3)  # in flight (another process: no event to wait on)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert first_503_after(server.base_url, sent) < 0.1
        time.sleep(0.3)
        during = c.get("/slow", params={"seconds": "0.05"})  # new requests still served
        assert during.status_code == 200
        assert in_flight.result().status_code == 200  # in flight at SIGTERM: finished
    assert server.process.wait(15) == 0  # the server's exit code after a graceful stop
    recorded = events(Path(env["EVENTS_FILE"]))
    last_request = max(at for at, event in recorded if event == "request end")
    closes = [at for at, event in recorded if event.startswith("close ")]
    assert len(closes) == 2 * workers
    assert min(closes) >= sent + 1.0  # not before the drain delay ended
    assert sum(at > last_request for at in closes) >= 2  # the serving worker's: after it
    assert [e for _, e in recorded].count("app shutdown") == workers  # the app's own hook
    drained = min(at for at, event in recorded if event == "drain")
    assert drained - sent < 0.1


def test_drain_against_hypercorn_started_by_hand(
    start: Callable[[Callable[[int], list[str]]], ServerProcess],
) -> None:
    server = start(
        lambda port: [sys.executable, "-m", "hypercorn", APP, "--bind", f"127.0.0.1:{port}"]
    )
    drain_and_check(server)


def test_drain_against_granian_started_by_hand(
    start: Callable[[Callable[[int], list[str]]], ServerProcess],
) -> None:
    server = start(
        lambda port: [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--port",
            str(port),
            APP,
        ]
    )
    drain_and_check(server)


def drain_and_check(server: ServerProcess) -> None:
    sent = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        command = pool.submit(
            subprocess.run,
            [*CLI, "drain", "--url", server.base_url],
            capture_output=True,
            text=True,
            timeout=15,
        )
        assert first_503_after(server.base_url, sent) < 0.5  # a new interpreter starts first
        assert httpx.get(server.base_url + "/slow?seconds=0.01").status_code == 200  # served
        done = command.result()
    took = time.monotonic() - sent
    assert done.returncode == 0, done.stderr
    assert done.stdout == "drained: draining after 1.0s\n"
    assert 1.0 <= took < 3.0  # returned once the drain delay had passed
    assert httpx.get(server.base_url + "/health/ready").status_code == 503  # until its SIGTERM
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(15)


def test_drain_says_why_it_failed(env: dict[str, str]) -> None:
    env["http_proxy"] = "http://proxy.invalid:3128"  # never used: it goes straight to the service
    done = subprocess.run(
        [*CLI, "drain", "--url", "http://127.0.0.1:1", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=15,
        env=env,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("asgi-resilience: drain: http://127.0.0.1:1/health/drain: ")
    assert "Connection refused" in done.stderr  # port 1 refused, not the proxy unresolved


# -- /health/drain, in process ---------------------------------------------------------------


def drain_scope(client: tuple[str, int] | None, method: str = "POST") -> Scope:
    scope = http_scope("/health/drain", method=method)
    scope["client"] = client
    return scope


@pytest.mark.anyio
@pytest.mark.parametrize(
    "client", [("10.1.2.3", 5000), ("203.0.113.9", 5000), None, ("testclient", 50000)]
)
async def test_only_a_loopback_peer_may_drain(client: tuple[str, int] | None) -> None:
    lifespan = Lifespan(drain_delay=0.05)
    health = HealthApp(lifespan)
    await lifespan.startup()
    try:
        response = await call(health, drain_scope(client))
        assert response.status == 404  # as if there were no such endpoint
        assert lifespan.state == "ready"
        forwarded = drain_scope(("10.1.2.3", 5000))
        forwarded["headers"] = [(b"x-forwarded-for", b"127.0.0.1")]
        assert (await call(health, forwarded)).status == 404  # never a forwarded address
        for header in (b"X-Forwarded-For", b"forwarded", b"x-envoy-external-address"):
            # From a proxy on this machine (a sidecar): loopback peer, remote client.
            through_proxy = drain_scope(("127.0.0.1", 5000))
            through_proxy["headers"] = [(header, b"203.0.113.9")]
            assert (await call(health, through_proxy)).status == 404
        assert lifespan.state == "ready"
    finally:
        await lifespan.shutdown()


@pytest.mark.anyio
async def test_a_loopback_drain_fails_readiness_at_once_and_answers_after_the_delay() -> None:
    lifespan = Lifespan(drain_delay=0.3)
    health = HealthApp(lifespan, cache_ttl=0)
    await lifespan.startup()
    try:
        wrong = await call(health, drain_scope(("127.0.0.1", 5000), method="GET"))
        assert wrong.status == 405
        assert wrong.headers["allow"] == "POST"
        answered: list[float] = []
        began = anyio.current_time()

        async def drain() -> None:
            response = await call(health, drain_scope(("::ffff:127.0.0.1", 5000)))
            assert response.status == 200
            assert response.json() == {"status": "draining", "drain_delay": 0.3}
            answered.append(anyio.current_time() - began)

        async with anyio.create_task_group() as group:
            group.start_soon(drain)
            await anyio.sleep(0.01)
            assert (await call(health, http_scope("/health/ready"))).status == 503
            going_away = lifespan.going_away
            assert going_away is not None and not going_away.is_set()
        assert 0.3 <= answered[0] < 0.6
        assert going_away is not None and going_away.is_set()  # told to close
    finally:
        await lifespan.shutdown()


def test_hypercorn_workers_stop_together_when_one_dies(
    start: Callable[[Callable[[int], list[str]]], ServerProcess],
) -> None:
    server = start(
        lambda port: [
            *CLI,
            "run",
            APP,
            "--server",
            "hypercorn",
            "--port",
            str(port),
            "--workers",
            "2",
        ]
    )
    children = subprocess.run(
        ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(children) == 2
    os.kill(int(children[0]), signal.SIGKILL)
    assert server.process.wait(15) == 1  # the service ends: not one worker short
    time.sleep(0.2)  # the other worker's exit (another process: nothing to wait on)
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)
