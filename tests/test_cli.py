"""``asgi-resilience run/check/demo``: real subprocesses for serving, signals and exit codes,
in-process calls for the helpers and the branches that need no server."""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import pytest

from asgi_resilience import cli
from asgi_resilience.access_log import JsonFormatter
from asgi_resilience.stack import ResilientApp
from tests.apps import cli_target
from tests.servers import ROOT, free_port, metric_total, start_on_a_free_port, wait_until_ready

CONSOLE_SCRIPT = Path(sys.executable).with_name("asgi-resilience")
MODULE = [sys.executable, "-m", "asgi_resilience.cli"]
TARGET = "tests.apps.cli_target:app"
DURATION_COUNT = "http_server_request_duration_seconds_count"


@pytest.fixture(autouse=True)
def _process_state_unchanged() -> Iterator[None]:
    with process_state_kept():
        yield


@contextmanager
def process_state_kept() -> Iterator[None]:
    """In-process calls change ``os.environ``, the SIGTERM handler and the root logger: every
    test must leave them as it found them."""
    before = dict(os.environ)
    sigterm = signal.getsignal(signal.SIGTERM)
    handlers = own_root_handlers()
    yield
    assert signal.getsignal(signal.SIGTERM) == sigterm
    assert own_root_handlers() == handlers
    after = dict(os.environ)
    for environ in (before, after):
        environ.pop("PYTEST_CURRENT_TEST", None)
    assert after == before


def is_pytest_handler(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")


def own_root_handlers() -> list[logging.Handler]:
    """The root logger's handlers but those pytest adds and removes around each test phase."""
    return [h for h in logging.getLogger().handlers if not is_pytest_handler(h)]


@contextmanager
def logging_restored() -> Iterator[None]:
    """Undo ``configure_logging``: its handler replaced every root handler, pytest's too."""
    root = logging.getLogger()
    handlers, level = own_root_handlers(), root.level
    try:
        yield
    finally:
        root.handlers[:] = [*handlers, *filter(is_pytest_handler, root.handlers)]
        root.setLevel(level)


# -- running the command -------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without our settings, so that only the test's own apply."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ASGI_RESILIENCE_", "_ASGI_RESILIENCE_", "CLI_TARGET_"))
        and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    return {**env, **extra}


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    stdout_path: Path
    stderr_path: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.base_url, timeout=10)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then the exit code."""
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def log_records(self) -> list[dict[str, Any]]:
        """Every stdout line, parsed: each must be one JSON object."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def access_records(self) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r["logger"] == "asgi_resilience.access"]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    with servers_started(tmp_path) as start:
        yield start


@contextmanager
def servers_started(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``asgi-resilience <args>`` on a free loopback port; killed at the end if alive."""
    servers: list[Server] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        ready_path: str = "/health/ready",
        command: list[str] | None = None,
    ) -> Server:
        number = len(servers)
        stdout_path = tmp_path / f"stdout-{number}.log"
        stderr_path = tmp_path / f"stderr-{number}.log"

        def on(port: int) -> subprocess.Popen[bytes]:
            with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
                return subprocess.Popen(
                    [*(command or MODULE), *args, "--port", str(port)],
                    cwd=ROOT,
                    env=env if env is not None else clean_env(),
                    stdout=stdout,
                    stderr=stderr,
                )

        def output() -> str:
            return f"{stdout_path.read_text()}\n{stderr_path.read_text()}"

        process, port = start_on_a_free_port(on, output)
        server = Server(process, f"http://127.0.0.1:{port}", stdout_path, stderr_path)
        servers.append(server)
        wait_until_ready(server.base_url, process, ready_path, output=output)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.client.close()
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait(5)


def run_command(
    *args: str, env: dict[str, str] | None = None, timeout: float = 15
) -> tuple[int, str, str]:
    """Run the command to its end: exit code, stdout, stderr (killed if it outlives timeout)."""
    process = subprocess.Popen(
        [*MODULE, *args],
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    return process.returncode, stdout, stderr


def table(output: str) -> dict[str, list[str]]:
    """The rows of the ``check`` table, by check name: ``[outcome, duration, error]``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"check\s+outcome\s+duration", line))
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if line.startswith(("startup ok", "startup failed")):
            break
        name, *cells = re.split(r"\s{2,}", line.strip())
        rows[name] = cells
    return rows


def unset(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Remove ``name`` from the environment until the test ends, also if the test sets it.

    (``monkeypatch.delenv`` of an unset variable records nothing to undo.)"""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


# -- run -----------------------------------------------------------------------------------------


def test_run_serves_with_request_ids_json_logs_metrics_and_drains_on_sigterm(
    serve: Callable[..., Server],
) -> None:
    assert CONSOLE_SCRIPT.exists(), "pip install -e '.[dev]' installs the asgi-resilience script"
    server = serve("run", TARGET, command=[str(CONSOLE_SCRIPT)])
    client = server.client
    hello = client.get("/hello", headers={"X-Request-ID": "cli-req-1"})
    generated = client.get("/hello")
    assert hello.json() == {"hello": "world"}
    assert hello.headers.get_list("x-request-id") == ["cli-req-1"]
    assert len(generated.headers["x-request-id"]) >= 16
    assert client.get("/health/ready").json()["status"] == "ready"
    assert client.get("/health/live").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metric_total(metrics.text, DURATION_COUNT, route="/hello", status_code="200") == 2
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            httpx.get, f"{server.base_url}/slow", params={"seconds": "1"}, timeout=10
        )
        time.sleep(0.3)  # the request reaches the app long before it answers
        exit_code = server.stop()
        slow = in_flight.result()
    assert exit_code == 0, server.stderr
    assert slow.status_code == 200  # drained: the request in flight at SIGTERM completed
    assert server.stderr == ""
    records = server.log_records()  # every stdout line is a JSON object
    access = [(r["request_id"], r["route"], r["status"]) for r in server.access_records()]
    assert access == [
        ("cli-req-1", "/hello", 200),
        (generated.headers["x-request-id"], "/hello", 200),
        (slow.headers["x-request-id"], "/slow", 200),
    ]
    messages = [r["message"] for r in records]
    assert "Draining: readiness now fails" in messages
    assert messages.index("Draining: readiness now fails") < messages.index(
        "Application shutdown complete."
    )


def test_run_serves_a_resilient_app_as_it_is(serve: Callable[..., Server]) -> None:
    server = serve("run", "tests.apps.cli_target:wrapped", ready_path="/probes/ready")
    hello = server.client.get("/hello", headers={"X-Request-ID": "wrapped-1"})
    assert server.client.get("/health/ready").status_code == 404  # its own health path is kept
    assert server.stop() == 0, server.stderr
    assert hello.json()["success"] is True  # its own envelope option is kept
    assert hello.json()["data"] == {"hello": "world"}
    assert hello.headers.get_list("x-request-id") == ["wrapped-1"]
    hellos = [r for r in server.access_records() if r["path"] == "/hello"]
    assert [r["request_id"] for r in hellos] == ["wrapped-1"]  # one access log layer


def test_run_plain_logs(serve: Callable[..., Server]) -> None:
    server = serve("run", TARGET, "--plain-logs")
    assert server.client.get("/hello", headers={"X-Request-ID": "plain-1"}).status_code == 200
    assert server.stop() == 0, server.stderr
    lines = server.stdout.splitlines()
    assert lines and not any(line.startswith("{") for line in lines)
    pattern = re.compile(r"INFO asgi_resilience\.access \[plain-1\] GET /hello 200 [\d.]+ms$")
    assert [line for line in lines if pattern.search(line)], lines


def test_run_env_file_configures_the_stack_and_set_variables_win(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    env_file = tmp_path / "service.env"
    env_file.write_text(
        "# settings of the service\n"
        "\n"
        'export ASGI_RESILIENCE_RATE_LIMIT="3/minute"\n'
        "CLI_TARGET_QUOTED='single quoted'\n"
        "  CLI_TARGET_SPACED = spaced value  \n"
        "CLI_TARGET_ALREADY_SET=from the file\n"
    )
    env = clean_env(CLI_TARGET_ALREADY_SET="from the environment")
    server = serve("run", TARGET, "--env-file", str(env_file), env=env)
    variables = server.client.get("/env").json()["variables"]
    statuses = [server.client.get("/hello").status_code for _ in range(5)]
    ready = server.client.get("/health/ready")
    assert server.stop() == 0, server.stderr
    assert variables == {
        "CLI_TARGET_QUOTED": "single quoted",
        "CLI_TARGET_SPACED": "spaced value",
        "CLI_TARGET_ALREADY_SET": "from the environment",
    }
    assert statuses[0] == 200
    assert 429 in statuses, statuses
    assert ready.status_code == 200  # probes are never limited


def test_run_workers_share_a_multiprocess_metrics_directory_removed_at_the_end(
    serve: Callable[..., Server],
) -> None:
    server = serve("run", TARGET, "--workers", "2")
    pids: Counter[int] = Counter()
    directories: set[str] = set()
    sent = 0
    limits = httpx.Limits(max_keepalive_connections=0)  # fresh connections reach both workers
    with (
        httpx.Client(base_url=server.base_url, timeout=10, limits=limits) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        while len(pids) < 2 and sent < 400:
            for answer in pool.map(lambda _: client.get("/env").json(), range(8)):
                pids[answer["pid"]] += 1
                directories.add(answer["multiproc_dir"])
            sent += 8
        scrapes = [client.get("/metrics").text for _ in range(4)]
    assert len(pids) == 2, f"one worker served all {sent} requests"
    [directory] = directories
    assert directory is not None
    assert Path(directory).parent == Path(tempfile.gettempdir())
    assert Path(directory).name.startswith("asgi-resilience-metrics-")
    assert Path(directory).is_dir()
    for scrape in scrapes:  # whichever worker answers sums every worker's requests
        assert metric_total(scrape, DURATION_COUNT, route="/env") == sent
        assert metric_total(scrape, DURATION_COUNT, route="/metrics") == 0
    assert server.process.pid not in pids
    assert server.stop() == 0, server.stderr
    assert not Path(directory).exists()


def test_demo_serves_items_from_sqlite_and_stops_on_sigterm(serve: Callable[..., Server]) -> None:
    server = serve("demo")
    item = server.client.get("/items/1")
    ready = server.client.get("/health/ready")
    assert server.stop() == 0, server.stderr
    assert item.status_code == 200
    assert item.json()["success"] is True
    assert item.json()["data"] == {"id": 1, "name": "anvil"}
    assert ready.status_code == 200


# -- bad arguments -------------------------------------------------------------------------------


def assert_usage_error(exit_code: int, stderr: str, *fragments: str) -> None:
    assert exit_code == 2, stderr
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    assert line.startswith("asgi-resilience: error: ")
    for fragment in fragments:
        assert fragment in line


@pytest.mark.parametrize(
    ("target", "fragments"),
    [
        ("no_such_module_anywhere:app", ("no module named 'no_such_module_anywhere'",)),
        ("tests.apps.cli_target:missing", ("has no attribute 'missing'",)),
        ("tests.apps.cli_target:not_an_app", ("is not an ASGI app", "int")),
        ("nocolon", ("expected module:attribute", "'nocolon'")),
    ],
)
def test_run_bad_target(target: str, fragments: tuple[str, ...]) -> None:
    assert_usage_error(*run_command("run", target)[::2], *fragments)


def test_run_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exit_code, _, stderr = run_command("run", TARGET, "--port", str(port))
    assert_usage_error(exit_code, stderr, f"cannot listen on 127.0.0.1:{port}")


def test_run_bad_env_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.env"
    exit_code, _, stderr = run_command("run", TARGET, "--env-file", str(missing))
    assert_usage_error(exit_code, stderr, "cannot read --env-file", str(missing))
    bad = tmp_path / "bad.env"
    bad.write_text("GOOD=1\n# fine\nnot a setting\n")
    exit_code, _, stderr = run_command("run", TARGET, "--env-file", str(bad))
    assert_usage_error(exit_code, stderr, f"{bad}:3", "expected KEY=VALUE", "'not a setting'")


@pytest.mark.parametrize("command", ["run", "check"])
def test_bad_environment_value_names_the_variable_and_the_value(command: str) -> None:
    env = clean_env(ASGI_RESILIENCE_RATE_LIMIT="ten")
    exit_code, _, stderr = run_command(command, TARGET, env=env)
    assert_usage_error(exit_code, stderr, "ASGI_RESILIENCE_RATE_LIMIT", "'ten'")


# -- check ---------------------------------------------------------------------------------------


def test_check_timeout_exits_1_promptly() -> None:
    began = time.monotonic()
    exit_code, stdout, _ = run_command("check", "tests.apps.cli_checks:hanging", timeout=10)
    assert time.monotonic() - began < 3
    assert exit_code == 1
    assert table(stdout)["search"][0] == "timeout"
    assert table(stdout)["search"][2] == "timed out after 0.5s"


def test_check_timeout_of_a_blocking_sync_check_exits_1_promptly() -> None:
    """A sync check runs in a thread, abandoned at its timeout: it must not hold the exit."""
    began = time.monotonic()
    try:
        exit_code, stdout, _ = run_command("check", "tests.apps.cli_checks:hanging_sync", timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("check still running 5 s after a check timed out at 0.5 s", pytrace=False)
    assert time.monotonic() - began < 3
    assert exit_code == 1
    assert table(stdout)["legacy-driver"][0] == "timeout"


def test_check_passing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "tests.apps.cli_checks:passing"]) == 0
    out = capsys.readouterr().out
    assert table(out)["database"][0] == "ok"
    assert re.fullmatch(r"\d+ ms", table(out)["database"][1])
    assert out.splitlines()[-1] == "startup ok: 1 check"


def test_check_failing_critical(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "tests.apps.cli_checks:failing"]) == 1
    out = capsys.readouterr().out
    outcome, _, error = table(out)["payments-api"]
    assert outcome == "error"
    assert error == "ConnectionRefusedError: payments-api refused the connection"
    assert out.splitlines()[-1] == "startup failed: check 'payments-api' failed"  # why: above


def test_check_non_critical_failure_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "tests.apps.cli_checks:degraded"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["cache"][0] == "error (non-critical)"
    assert rows["cache"][2] == "TimeoutError: cache did not answer"
    assert rows["database"][0] == "ok"


def test_check_a_lifespan_given_to_starlette(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "tests.apps.cli_checks:starlette_app"]) == 0
    rows = table(capsys.readouterr().out)
    assert list(rows) == ["queue"]
    assert rows["queue"][0] == "ok"


def test_check_a_plain_app_has_no_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "tests.apps.cli_checks:plain"]) == 0
    out = capsys.readouterr().out
    assert table(out) == {}
    assert out.splitlines()[-1] == "startup ok: 0 checks"


def test_check_reads_the_env_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("ASGI_RESILIENCE_RATE_LIMIT=ten\n")
    with pytest.MonkeyPatch.context() as patch:
        unset(patch, "ASGI_RESILIENCE_RATE_LIMIT")
        code = cli.main(["check", "tests.apps.cli_checks:plain", "--env-file", str(env_file)])
    assert code == 2
    assert "ASGI_RESILIENCE_RATE_LIMIT" not in os.environ
    assert "ASGI_RESILIENCE_RATE_LIMIT='ten'" in capsys.readouterr().err


# -- main() in process: uvicorn.run replaced, nothing served -------------------------------------


@dataclass
class FakeUvicorn:
    calls: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    during: Callable[[], None] | None = None

    def run(self, app: Any, **options: Any) -> None:
        self.calls.append((app, options))
        if self.during is not None:
            self.during()


@pytest.fixture
def fake_uvicorn(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeUvicorn]:
    with uvicorn_faked(monkeypatch) as fake:
        yield fake


@contextmanager
def uvicorn_faked(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeUvicorn]:
    """``uvicorn.run`` recorded; the process state ``run`` changes restored afterwards."""
    import uvicorn

    fake = FakeUvicorn()
    monkeypatch.setattr(uvicorn, "run", fake.run)
    for name in (
        "PROMETHEUS_MULTIPROC_DIR",
        "_ASGI_RESILIENCE_CLI_TARGET",
        "_ASGI_RESILIENCE_CLI_PLAIN_LOGS",
        "_ASGI_RESILIENCE_CLI_LOG_LEVEL",
        "_ASGI_RESILIENCE_CLI_FACTORY",
        "_ASGI_RESILIENCE_CLI_LOG_CONFIG",
        "_ASGI_RESILIENCE_CLI_ROOT_PATH",
        "ASGI_RESILIENCE_RATE_LIMIT",
    ):
        unset(monkeypatch, name)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with logging_restored():
            yield fake
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def test_main_run_wraps_the_app_and_serves_it(fake_uvicorn: FakeUvicorn) -> None:
    port = free_port()
    assert cli.main(["run", TARGET, "--port", str(port), "--log-level", "warning"]) == 0
    [(app, options)] = fake_uvicorn.calls
    assert isinstance(app, ResilientApp)
    assert app.app is cli_target.app
    assert options == {
        "host": "127.0.0.1",
        "port": port,
        "log_config": None,
        "access_log": False,
        "log_level": "warning",
        "proxy_headers": False,  # trusted_proxies alone names the client
        "root_path": "",
    }
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler)
    frame: FrameType | None = None
    assert handler(signal.SIGTERM, frame) is None  # uvicorn's re-raised SIGTERM: exit code 0
    [root_handler] = logging.getLogger().handlers
    assert isinstance(root_handler.formatter, JsonFormatter)
    assert logging.getLogger().level == logging.WARNING


def test_main_run_serves_a_resilient_app_as_it_is(fake_uvicorn: FakeUvicorn) -> None:
    assert cli.main(["run", "tests.apps.cli_target:wrapped", "--port", str(free_port())]) == 0
    assert fake_uvicorn.calls[0][0] is cli_target.wrapped


def test_main_run_workers_use_a_metrics_directory_of_their_own(
    fake_uvicorn: FakeUvicorn,
) -> None:
    seen: dict[str, Any] = {}

    def in_uvicorn() -> None:
        seen["directory"] = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        seen["exists"] = seen["directory"].is_dir()
        seen["app"] = cli.worker_app()  # what each worker process does
        seen["formatter"] = logging.getLogger().handlers[0].formatter
        seen["level"] = logging.getLogger().level

    fake_uvicorn.during = in_uvicorn
    port = free_port()
    command = ["run", TARGET, "--port", str(port), "--workers", "3", "--plain-logs"]
    assert cli.main([*command, "--log-level", "warning"]) == 0
    [(app, options)] = fake_uvicorn.calls
    assert app == "asgi_resilience.cli:worker_app"
    assert options["factory"] is True and options["workers"] == 3
    assert seen["exists"] and not seen["directory"].exists()
    assert isinstance(seen["app"], ResilientApp) and seen["app"].app is cli_target.app
    assert type(seen["formatter"]) is logging.Formatter  # --plain-logs reaches the workers
    assert seen["level"] == logging.WARNING  # and so does --log-level
    assert os.environ["_ASGI_RESILIENCE_CLI_TARGET"] == TARGET


def test_main_run_workers_remove_the_directory_when_uvicorn_fails(
    fake_uvicorn: FakeUvicorn,
) -> None:
    def in_uvicorn() -> None:
        raise RuntimeError("uvicorn failed")

    fake_uvicorn.during = in_uvicorn
    with pytest.raises(RuntimeError, match="uvicorn failed"):
        cli.main(["run", TARGET, "--port", str(free_port()), "--workers", "2"])
    assert not Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).exists()


def test_main_run_workers_keep_a_metrics_directory_already_set(
    fake_uvicorn: FakeUvicorn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert cli.main(["run", TARGET, "--port", str(free_port()), "--workers", "2"]) == 0
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
    assert tmp_path.is_dir()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", TARGET, "--workers", "0"], "--workers must be at least 1, got 0"),
        (["run", TARGET, "--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["run", TARGET, "--port", "65536"], "--port must be between 1 and 65535, got 65536"),
        (["demo", "--port", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["run", "nocolon"], "expected module:attribute, got 'nocolon'"),
    ],
)
def test_main_usage_errors(
    fake_uvicorn: FakeUvicorn, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"asgi-resilience: error: {message}\n"
    assert fake_uvicorn.calls == []


def test_main_bad_environment_value(
    fake_uvicorn: FakeUvicorn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ASGI_RESILIENCE_RATE_LIMIT", "ten")
    assert cli.main(["run", TARGET, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asgi-resilience: error: ASGI_RESILIENCE_RATE_LIMIT='ten': ")
    assert fake_uvicorn.calls == []


def test_main_without_uvicorn(
    fake_uvicorn: FakeUvicorn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    assert cli.main(["demo", "--port", str(free_port())]) == 2
    assert "pip install 'asgi-resilience[server]'" in capsys.readouterr().err


def test_main_demo(fake_uvicorn: FakeUvicorn) -> None:
    port = free_port()
    assert cli.main(["demo", "--host", "127.0.0.1", "--port", str(port)]) == 0
    [(app, options)] = fake_uvicorn.calls
    assert isinstance(app, ResilientApp)
    assert options == {"host": "127.0.0.1", "port": port, "log_config": None, "access_log": False}


@pytest.mark.parametrize("argv", [[], ["serve", TARGET], ["run"], ["run", TARGET, "--port", "x"]])
def test_argparse_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("usage: asgi-resilience")


def test_console_script_entry_point_exits_with_the_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["asgi-resilience", "check", "tests.apps.cli_checks:plain"])
    with pytest.raises(SystemExit) as exited:
        cli._main()
    assert exited.value.code == 0
    with pytest.raises(SystemExit) as exited, warnings.catch_warnings():
        # runpy notes that the module was imported already: it runs it again as __main__.
        warnings.filterwarnings("ignore", "'asgi_resilience.cli' found in sys.modules")
        runpy.run_module("asgi_resilience.cli", run_name="__main__")
    assert exited.value.code == 0
    assert capsys.readouterr().out.count("startup ok: 0 checks") == 2


# -- helpers -------------------------------------------------------------------------------------


def test_load_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["CLI_TARGET_" + suffix for suffix in "ABCDEFGHI"]
    for name in names:
        unset(monkeypatch, name)
    monkeypatch.setenv("CLI_TARGET_I", "already set")
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\n"
        "\n"
        "CLI_TARGET_A=plain\n"
        "export CLI_TARGET_B=exported\n"
        'CLI_TARGET_C="double quoted # not a comment"\n'
        "CLI_TARGET_D='single quoted'\n"
        "CLI_TARGET_E=a=b=c\n"
        "CLI_TARGET_F=\n"
        "   CLI_TARGET_G  =  padded  \n"
        "CLI_TARGET_H=\"mismatched'\n"
        "CLI_TARGET_I=from the file\n"
        "CLI_TARGET_A=second time\n"
    )
    cli.load_env_file(env_file)
    assert {name: os.environ[name] for name in names} == {
        "CLI_TARGET_A": "plain",
        "CLI_TARGET_B": "exported",
        "CLI_TARGET_C": "double quoted # not a comment",
        "CLI_TARGET_D": "single quoted",
        "CLI_TARGET_E": "a=b=c",
        "CLI_TARGET_F": "",
        "CLI_TARGET_G": "padded",
        "CLI_TARGET_H": "\"mismatched'",
        "CLI_TARGET_I": "already set",
    }


@pytest.mark.parametrize("line", ["NO_EQUALS", "=value", "1ABC=x", "A B=c", "export"])
def test_load_env_file_rejects_a_bad_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str
) -> None:
    unset(monkeypatch, "CLI_TARGET_OK")
    env_file = tmp_path / ".env"
    env_file.write_text(f"CLI_TARGET_OK=1\n\n{line}\n")
    with pytest.raises(cli.UsageError) as raised:
        cli.load_env_file(env_file)
    assert str(raised.value) == f"{env_file}:3: expected KEY=VALUE, got {line!r}"


def test_load_env_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(cli.UsageError, match=r"cannot read --env-file .*: Is a directory"):
        cli.load_env_file(tmp_path)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nocolon", "expected module:attribute, got 'nocolon'"),
        (":app", "expected module:attribute, got ':app'"),
        ("tests.apps.cli_target:", "expected module:attribute, got 'tests.apps.cli_target:'"),
        ("no_such_module_anywhere:app", "no module named 'no_such_module_anywhere'"),
        ("tests.apps.no_such_module:app", "no module named 'tests.apps.no_such_module'"),
        ("no_such_package.sub:app", "no module named 'no_such_package.sub'"),
        ("tests.apps.cli_target:missing", "module 'tests.apps.cli_target' has no attribute"),
        ("tests.apps.cli_target:app.missing", "has no attribute 'app.missing'"),
        (
            "tests.apps.cli_target:not_an_app",
            "tests.apps.cli_target:not_an_app is not an ASGI app: a int is not callable",
        ),
    ],
)
def test_load_app_errors(target: str, message: str) -> None:
    with pytest.raises(cli.UsageError) as raised:
        cli.load_app(target)
    assert message in str(raised.value)


def test_load_app_dotted_attribute() -> None:
    assert cli.load_app("tests.apps.cli_target:app.router") is cli_target.app.router


def test_load_app_names_a_module_import_error_and_where_it_was_raised() -> None:
    """A module that exists but fails to import shows its own error, not "no module"."""
    with pytest.raises(cli.UsageError) as raised:
        cli.load_app("tests.apps.cli_broken_import:app")
    assert str(raised.value) == (
        "cannot import 'tests.apps.cli_broken_import': ModuleNotFoundError: No module named "
        "'cli_missing_dependency' (tests/apps/cli_broken_import.py, line 7)"
    )


def test_load_app_missing_module_whose_name_prefixes_the_target() -> None:
    """``settings_local`` importing a missing ``settings``: the module exists, its import fails."""
    with pytest.raises(cli.UsageError) as raised:
        cli.load_app("tests.apps.cli_settings_local:app")
    assert str(raised.value).startswith(
        "cannot import 'tests.apps.cli_settings_local': ModuleNotFoundError: No module named "
        "'tests.apps.cli_settings' (tests/apps/cli_settings_local.py, line "
    )


def test_load_app_finds_modules_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cli_cwd_service.py").write_text("async def app(scope, receive, send):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        app = cli.load_app("cli_cwd_service:app")
    finally:
        sys.modules.pop("cli_cwd_service", None)
    assert callable(app)
    assert sys.path[0] == str(tmp_path)


def test_ensure_port_free() -> None:
    port = free_port()
    cli._ensure_port_free("127.0.0.1", port)  # nothing listens there
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(cli.UsageError, match=rf"cannot listen on 127\.0\.0\.1:{port}: "):
            cli._ensure_port_free("127.0.0.1", port)
    for bad in (0, -1, 65536):
        with pytest.raises(cli.UsageError, match="--port must be between 1 and 65535"):
            cli._ensure_port_free("127.0.0.1", bad)


def test_ensure_port_free_ipv6() -> None:
    try:
        taken = socket.socket(socket.AF_INET6)
        taken.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with taken:
        port = taken.getsockname()[1]
        taken.listen()
        with pytest.raises(cli.UsageError, match=rf"cannot listen on ::1:{port}"):
            cli._ensure_port_free("::1", port)
    cli._ensure_port_free("::1", port)


def test_configure_logging(capsys: pytest.CaptureFixture[str]) -> None:
    with logging_restored():
        cli.configure_logging("debug")
        logging.getLogger("cli.test").debug("json %s", "line")
        cli.configure_logging("info", plain=True)
        logging.getLogger("cli.test").debug("not shown")
        logging.getLogger("cli.test").info("plain line")
    first, second = capsys.readouterr().out.splitlines()
    record = json.loads(first)
    assert (record["level"], record["logger"], record["message"]) == (
        "DEBUG",
        "cli.test",
        "json line",
    )
    assert record["request_id"] == "-"
    assert second.endswith(" INFO cli.test [-] plain line")


def test_run_ignores_forwarding_headers_from_an_untrusted_local_client(
    serve: Callable[..., Server],
) -> None:
    # uvicorn's own proxy_headers would believe any local peer: the command turns it off.
    server = serve("run", "tests.apps.cli_target:app")
    assert server.client.get("/hello", headers={"X-Forwarded-For": "203.0.113.7"}).is_success
    assert server.client.get("/hello", headers={"X-Forwarded-For": "not-an-ip"}).is_success
    assert server.stop() == 0
    clients = {r["client"] for r in server.access_records() if r["path"] == "/hello"}
    assert clients == {"127.0.0.1"}


def test_run_on_a_unix_socket_trusts_the_proxy_in_front(tmp_path: Path) -> None:
    socket_path = tmp_path / "service.sock"
    stdout_path = tmp_path / "stdout.log"
    with stdout_path.open("wb") as stdout:
        process = subprocess.Popen(
            [*MODULE, "run", "tests.apps.cli_target:app", "--uds", str(socket_path)],
            cwd=ROOT,
            env=clean_env(),
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while not socket_path.exists():  # a connect to a missing socket leaks httpcore's socket
            assert process.poll() is None and time.monotonic() < deadline, stdout_path.read_text()
            time.sleep(0.05)
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://proxied"
        ) as client:
            while True:
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None and time.monotonic() < deadline, (
                    stdout_path.read_text()
                )
                time.sleep(0.05)
            for address in ("203.0.113.7", "203.0.113.8"):
                assert client.get("/hello", headers={"X-Forwarded-For": address}).is_success
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    records = [json.loads(line) for line in stdout_path.read_text().splitlines() if line.strip()]
    clients = [r["client"] for r in records if r.get("path") == "/hello"]
    assert clients == ["203.0.113.7", "203.0.113.8"]
