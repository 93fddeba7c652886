"""The Prometheus multiprocess directory (asgi_resilience._multiprocess): emptied before a run,
its killed workers' live gauges dropped at the next scrape, under real ``asgi-resilience run
--workers 2`` processes (tests/apps/held.py, whose ``/hold`` requests stay in flight until the
test releases them) and on files made by hand."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from asgi_resilience._multiprocess import clear_directory, remove_dead_live_gauges
from tests.servers import ServerProcess, free_port, start_command
from tests.servers import metric_total as total

CLI = [sys.executable, "-m", "asgi_resilience.cli"]
ACTIVE = "http_server_active_requests"
DURATION_COUNT = "http_server_request_duration_seconds_count"
FRESH_CONNECTIONS = httpx.Limits(max_keepalive_connections=0)  # the kernel spreads them


def children(process: subprocess.Popen[bytes]) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    variables = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ASGI_RESILIENCE_", "_ASGI_RESILIENCE_"))
    }
    return {
        **variables,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        "HELD_FILE": str(tmp_path / "held.txt"),
        "RELEASE_FILE": str(tmp_path / "release"),
    }


@pytest.fixture
def run(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[[str], ServerProcess]]:
    """``run(target)``: ``asgi-resilience run target --workers 2`` on a free port, ready."""
    started: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> ServerProcess:
        command = [*CLI, "run", target, "--workers", "2", "--port"]
        log = tmp_path / f"server-{len(started)}.log"
        return start_command(lambda port: [*command, str(port)], env=env, log=log, started=started)

    yield start
    Path(env["RELEASE_FILE"]).touch()
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(5)


# -- real workers ---------------------------------------------------------------------------------


def test_a_killed_worker_leaves_no_requests_in_flight_behind(
    run: Callable[[str], ServerProcess], env: dict[str, str]
) -> None:
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()
    server = run("tests.apps.held:app")
    base_url, held_file = server.base_url, Path(env["HELD_FILE"])
    held: list[threading.Thread] = []

    def hold() -> None:
        try:
            httpx.get(base_url + "/hold", timeout=40)
        except httpx.TransportError:
            pass  # its worker was killed

    def held_by() -> Counter[int]:
        lines = held_file.read_text().split() if held_file.exists() else []
        return Counter(int(line) for line in lines)

    with httpx.Client(base_url=base_url, timeout=10, limits=FRESH_CONNECTIONS) as client:
        served: Counter[int] = Counter()
        with ThreadPoolExecutor(8) as pool:
            while len(served) < 2 and served.total() < 400:
                served.update(int(r.text) for r in pool.map(lambda _: client.get("/pid"), range(8)))
        while len(held_by()) < 2 and len(held) < 48:  # requests in flight on both workers
            for _ in range(4):
                held.append(threading.Thread(target=hold, daemon=True))
                held[-1].start()
            deadline = time.monotonic() + 5
            while held_by().total() < len(held) and time.monotonic() < deadline:
                time.sleep(0.02)  # another process: nothing to wait on but its file
        in_flight = held_by()
        assert len(served) == 2 and len(in_flight) == 2, (served, in_flight)
        assert total(client.get("/metrics").text, ACTIVE) == in_flight.total()

        victim, survivor = (pid for pid, _ in in_flight.most_common())
        workers = children(server.process)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while not children(server.process) - workers:  # uvicorn starts its replacement
            assert time.monotonic() - killed < 10, server.output()
            time.sleep(0.05)
        restarted = time.monotonic() - killed
        after_restart = client.get("/metrics").text  # the first scrape after the restart
        print(f"worker restarted {restarted:.2f}s after SIGKILL")

        assert total(after_restart, ACTIVE) == in_flight[survivor]
        # The dead worker's counts stay in the totals: counters never go down.
        assert total(after_restart, DURATION_COUNT, route="/pid") == served.total()
        assert total(after_restart, DURATION_COUNT, route="/pid") > served[survivor]

        Path(env["RELEASE_FILE"]).touch()
        for thread in held:
            thread.join(10)
        released = client.get("/metrics").text
    assert total(released, ACTIVE) == 0
    assert total(released, DURATION_COUNT, route="/hold") == in_flight[survivor]
    assert server.stop(20) == 0, server.output()


def test_a_reused_directory_starts_each_run_from_zero(
    run: Callable[[str], ServerProcess], env: dict[str, str]
) -> None:
    directory = Path(env["PROMETHEUS_MULTIPROC_DIR"])  # missing: the first run makes it
    scrapes = []
    for requests in (7, 3):
        server = run("tests.apps.metered:app")
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            for _ in range(requests):
                assert client.get("/pid").status_code == 200
            scrapes.append(client.get("/metrics").text)
        (directory / "notes.txt").write_text("not prometheus_client's")
        assert server.stop(20) == 0, server.output()
        assert list(directory.glob("histogram_*.db"))  # left for the next run to clear
    assert [total(s, DURATION_COUNT, route="/pid") for s in scrapes] == [7, 3]
    assert (directory / "notes.txt").read_text() == "not prometheus_client's"


def test_one_worker_also_starts_from_an_emptied_directory_even_a_missing_one(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # held.py makes labelled metrics when imported (a circuit breaker, a rate limit): the
    # directory must exist before the app is first imported, whatever the worker count.
    directory = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    started: list[subprocess.Popen[bytes]] = []
    counts = []
    try:
        command = [*CLI, "run", "tests.apps.metered:app", "--port"]
        for requests in (4, 2):
            log = tmp_path / f"one-{requests}.log"
            server = start_command(
                lambda port: [*command, str(port)], env=env, log=log, started=started
            )
            with httpx.Client(base_url=server.base_url, timeout=10) as client:
                for _ in range(requests):
                    assert client.get("/pid").status_code == 200
                counts.append(total(client.get("/metrics").text, DURATION_COUNT, route="/pid"))
            assert server.stop(20) == 0, server.output()
        assert counts == [4, 2]
        held = [*CLI, "run", "tests.apps.held:app", "--port"]
        shutil.rmtree(directory)
        server = start_command(
            lambda port: [*held, str(port)], env=env, log=tmp_path / "held.log", started=started
        )
        assert server.stop(20) == 0, server.output()
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(5)


@pytest.mark.parametrize("inside", ["a-file", "a-file/below"])
def test_run_refuses_a_directory_it_cannot_use(
    tmp_path: Path, env: dict[str, str], inside: str
) -> None:
    (tmp_path / "a-file").write_text("")
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / inside)
    result = subprocess.run(
        [*CLI, "run", "tests.apps.metered:app", "--workers", "2", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"asgi-resilience: error: PROMETHEUS_MULTIPROC_DIR={tmp_path / inside}")
    assert "is not a writable directory" in line


# -- the files ------------------------------------------------------------------------------------


def test_clear_directory_removes_only_prometheus_client_files(tmp_path: Path) -> None:
    ours = ["counter_12.db", "histogram_12.db", "gauge_livesum_12.db", "gauge_all_7.db"]
    theirs = ["app.db", "notes.txt", "counter_12.db.bak", "counter_stats.db", "histogram_cache.db"]
    for name in ours + theirs:
        (tmp_path / name).write_text("")
    (tmp_path / "summary_3.db").mkdir()  # a directory, whatever its name
    assert clear_directory(tmp_path) == len(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, "summary_3.db"])


def test_clear_directory_makes_a_missing_one(tmp_path: Path) -> None:
    assert clear_directory(tmp_path / "a" / "b") == 0
    assert (tmp_path / "a" / "b").is_dir()


def test_clear_directory_raises_for_what_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        clear_directory(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        clear_directory(tmp_path / "file" / "below")


@pytest.fixture
def zombie() -> Iterator[int]:
    """The pid of a process that has ended but is not reaped yet."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)  # another process: nothing to wait on but its state
    yield process.pid
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are seen in /proc")
def test_live_gauges_of_dead_and_zombie_processes_go_the_rest_stays(
    tmp_path: Path, zombie: int
) -> None:
    dead, alive = dead_pid(), os.getpid()
    names = [
        *(f"gauge_{mode}_{pid}.db" for mode in ("livesum", "livemin") for pid in (dead, zombie)),
        *(f"gauge_livesum_{alive}.db", "gauge_livesum_worker-a.db"),  # alive; not a pid
        *(f"{kind}_{dead}.db" for kind in ("counter", "histogram", "gauge_all", "gauge_max")),
    ]
    for name in names:
        (tmp_path / name).write_text("")
    assert remove_dead_live_gauges(tmp_path) == sorted([dead, zombie])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[4:])
    assert remove_dead_live_gauges(tmp_path) == []


def test_a_process_that_cannot_be_probed_counts_as_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead, other_users = dead_pid(), dead_pid()

    def kill(pid: int, signum: int) -> None:
        if pid == other_users:
            raise PermissionError(1, "Operation not permitted")
        # As if ``dead`` were still there (or on a system without /proc): nothing to read.

    monkeypatch.setattr(os, "kill", kill)
    for pid in (dead, other_users):
        (tmp_path / f"gauge_livesum_{pid}.db").write_text("")
    assert remove_dead_live_gauges(tmp_path) == []
    assert len(list(tmp_path.iterdir())) == 2


def test_nothing_is_removed_on_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / f"gauge_livesum_{dead_pid()}.db").write_text("")
    monkeypatch.setattr(sys, "platform", "win32")
    assert remove_dead_live_gauges(tmp_path) == []
    assert len(list(tmp_path.iterdir())) == 1


CONCURRENCY_SCRIPT = """
import asyncio
from starlette.applications import Starlette
from asgi_resilience import resilient
from tests.asgi import call, http_scope

app = resilient(Starlette(), max_concurrency=4, access_log=False)
for path in ("/nowhere", "/metrics"):
    response = asyncio.run(call(app, http_scope(path)))
print(response.body.decode())
"""


def test_a_concurrency_limit_works_in_multiprocess_mode(tmp_path: Path) -> None:
    # prometheus_client's collectors (not our lock-free ones): label-less gauges included.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENCY_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert total(done.stdout, "asgi_resilience_concurrency_limit") == 4
    assert total(done.stdout, "asgi_resilience_concurrency_in_flight") == 0
