"""``asgi-resilience`` options beyond serving one app: ``--factory``, ``--log-config``,
``--version``, ``--uds`` and ``--root-path`` on every server, help and defaults, targets that
are not apps, a failed startup said once, and ``make demo PORT=...``.

Real subprocesses where the behaviour lives across processes (workers, servers, logging
configured in each); in-process calls (``uvicorn.run`` replaced) for the branches that need
no server. The helpers are tests/test_cli.py's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

import asgi_resilience
from asgi_resilience import Lifespan, StartupError, cli
from asgi_resilience._logconfig import apply_log_config
from asgi_resilience.lifespan import CheckResult
from tests.apps import cli_factory
from tests.servers import ROOT, free_port
from tests.test_cli import (
    MODULE,
    TARGET,
    FakeUvicorn,
    Server,
    assert_usage_error,
    clean_env,
    process_state_kept,
    run_command,
    servers_started,
    table,
    uvicorn_faked,
)

FACTORY = "tests.apps.cli_factory:create_app"


@pytest.fixture(autouse=True)
def _process_state_unchanged() -> Iterator[None]:
    with process_state_kept():
        yield


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    with servers_started(tmp_path) as start:
        yield start


@pytest.fixture
def fake_uvicorn(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeUvicorn]:
    with uvicorn_faked(monkeypatch) as fake:
        yield fake


def wait_for(condition: Callable[[], bool], server: Server, seconds: float = 15) -> None:
    """Until ``condition()`` holds of the server's output (another process: nothing to wait on
    but what it writes)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert server.process.poll() is None, server.stderr
        assert time.monotonic() < deadline, server.stderr
        time.sleep(0.02)


def wait_until_accepting(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the unix socket at ``path`` accepts a connection. Probed with a plain socket:
    httpcore leaks the socket of a connection that failed (a ResourceWarning)."""
    deadline = time.monotonic() + 15
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)  # another process: nothing to wait on but its socket


def run_in(directory: Path, *args: str, timeout: float = 15) -> tuple[int, str, str]:
    """``asgi-resilience <args>`` from ``directory`` (where its modules are): code, out, err."""
    completed = subprocess.run(
        [*MODULE, *args],
        cwd=directory,
        env=clean_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return completed.returncode, completed.stdout, completed.stderr


# -- --factory ---------------------------------------------------------------------------------


def test_check_factory_sees_the_checks_the_factory_registers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["check", FACTORY, "--factory"]) == 0
    out = capsys.readouterr().out
    assert table(out)["factory-db"][0] == "ok"
    assert out.splitlines()[-1] == "startup ok: 1 check"


@pytest.mark.parametrize("command", ["run", "check"])
def test_a_factory_without_factory_is_refused(command: str) -> None:
    exit_code, _, stderr = run_command(command, FACTORY)
    assert_usage_error(
        exit_code, stderr, f"{FACTORY} looks like an application factory; pass --factory"
    )


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "granian"])
def test_run_factory_serves_the_app_it_returns(serve: Callable[..., Server], server: str) -> None:
    """Granian builds the app in its worker process (``worker_app``) even with one worker."""
    served = serve("run", FACTORY, "--factory", "--server", server)
    made = served.client.get("/made")
    assert served.stop() == 0, served.stderr
    assert made.status_code == 200
    assert made.json()["calls"] == 1  # the app of the one call in the process that serves


def test_run_factory_with_workers_calls_it_in_each_worker(serve: Callable[..., Server]) -> None:
    served = serve("run", FACTORY, "--factory", "--workers", "2")
    answers: dict[int, int] = {}
    limits = httpx.Limits(max_keepalive_connections=0)  # fresh connections reach both workers
    with httpx.Client(base_url=served.base_url, timeout=10, limits=limits) as client:
        for _ in range(400):
            made = client.get("/made").json()
            answers[made["pid"]] = made["calls"]
            if len(answers) == 2:
                break
    assert served.stop() == 0, served.stderr
    assert len(answers) == 2, "one worker served every request"
    assert served.process.pid not in answers
    assert set(answers.values()) == {1}  # each worker called the factory once, itself


def test_main_run_workers_pass_the_factory_to_each_worker(fake_uvicorn: FakeUvicorn) -> None:
    seen: list[Any] = []
    fake_uvicorn.during = lambda: seen.append(cli.worker_app())
    calls = cli_factory.calls
    argv = ["run", FACTORY, "--factory", "--workers", "2", "--port", str(free_port())]
    assert cli.main(argv) == 0
    [worker] = seen
    assert isinstance(worker.app, Starlette)
    assert cli_factory.calls == calls + 2  # once to check it in the parent, once in the worker


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "tests.apps.cli_factory:create_app_async",
            "tests.apps.cli_factory:create_app_async returned a coroutine: --factory takes a "
            "plain function that returns the app",
        ),
        (
            "tests.apps.cli_factory:returns_none",
            "what tests.apps.cli_factory:returns_none returned is not an ASGI app: a NoneType "
            "is not callable",
        ),
        (
            "tests.apps.cli_factory:needs_settings",
            "tests.apps.cli_factory:needs_settings raised TypeError: needs_settings() missing 1 "
            "required positional argument: 'settings'",
        ),
        (
            "tests.apps.cli_factory:raises",
            "tests.apps.cli_factory:raises raised RuntimeError: DATABASE_URL is not set "
            "(tests/apps/cli_factory.py, line ",
        ),
        (
            "tests.apps.cli_factory:app",
            "tests.apps.cli_factory:app is an ASGI app, not an application factory: drop --factory",
        ),
        (
            "tests.apps.cli_factory:calls",
            "tests.apps.cli_factory:calls is not a factory: a int is not callable",
        ),
    ],
)
def test_factory_problems_are_one_line(
    capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    assert cli.main(["check", target, "--factory"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"asgi-resilience: error: {message}")


def test_worker_factory_serves_the_lifespan_it_returns(
    monkeypatch: pytest.MonkeyPatch, fake_uvicorn: FakeUvicorn
) -> None:
    served: list[Lifespan] = []
    monkeypatch.setattr(
        "asgi_resilience.worker.serve", lambda lifespan, **options: served.append(lifespan)
    )
    target = "tests.apps.cli_factory:create_lifespan"
    argv = ["worker", target, "--factory", "--port", str(free_port())]
    assert cli.main(argv) == 0
    assert [type(lifespan) for lifespan in served] == [Lifespan]
    assert cli.main(["worker", FACTORY, "--factory", "--port", str(free_port())]) == 2


# -- targets that are not apps -----------------------------------------------------------------


IMPORT_FAILURES = {
    "svc_zero": (
        "import os\n\nratio = 1 / 0\n",
        "cannot import 'svc_zero': ZeroDivisionError: division by zero (svc_zero.py, line 3)",
    ),
    "svc_deep": (
        "from svc_settings import settings\n",
        "cannot import 'svc_deep': KeyError: 'DATABASE_URL' (svc_settings.py, line 3)",
    ),
    "svc_missing": (
        "import svc_no_such_dependency\n",
        "cannot import 'svc_missing': ModuleNotFoundError: No module named "
        "'svc_no_such_dependency' (svc_missing.py, line 1)",
    ),
    "svc_syntax": ("def broken(:\n    pass\n", "cannot import 'svc_syntax': SyntaxError: "),
}


@pytest.mark.parametrize("module", sorted(IMPORT_FAILURES))
@pytest.mark.parametrize("command", ["run", "check"])
def test_a_module_that_fails_to_import_is_one_line(
    tmp_path: Path, module: str, command: str
) -> None:
    source, message = IMPORT_FAILURES[module]
    (tmp_path / f"{module}.py").write_text(source)
    (tmp_path / "svc_settings.py").write_text(
        "import os\n\nsettings = os.environ['DATABASE_URL']\n"
    )
    exit_code, _, stderr = run_in(tmp_path, command, f"{module}:app")
    assert_usage_error(exit_code, stderr, message)
    if module == "svc_syntax":
        assert "svc_syntax.py, line 1)" in stderr


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.apps.cli_target:Route", "tests.apps.cli_target:Route is a class, not an ASGI app"),
        (
            "tests.apps.cli_factory:Component",
            "tests.apps.cli_factory:Component is a class, not an ASGI app: name an instance of it",
        ),
        (
            "tests.apps.cli_factory:takes_two",
            "tests.apps.cli_factory:takes_two is not an ASGI app: it takes (scope, receive), an "
            "ASGI app takes (scope, receive, send)",
        ),
    ],
)
def test_a_class_or_a_function_that_is_no_app_is_refused(target: str, message: str) -> None:
    assert_usage_error(*run_command("run", target)[::2], message)


def test_an_instance_of_a_class_is_served(fake_uvicorn: FakeUvicorn) -> None:
    """A Starlette app is an instance with ``__call__(scope, receive, send)``: an app."""
    assert cli.main(["run", "tests.apps.cli_factory:app", "--port", str(free_port())]) == 0
    assert fake_uvicorn.calls[0][0].app is cli_factory.app


# -- --log-config ------------------------------------------------------------------------------

CONSOLE_FORMAT = "console %(levelname)s %(name)s %(message)s"


def dict_config(log_file: Path) -> dict[str, Any]:
    """Every record as JSON into ``log_file`` (``JsonFormatter`` by ``class``), and plain
    lines on stderr (where the test reads that the server is up)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"class": "asgi_resilience.JsonFormatter"},
            "console": {"format": CONSOLE_FORMAT},
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(log_file),
                "formatter": "json",
            },
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "console",
            },
        },
        "root": {"level": "INFO", "handlers": ["file", "console"]},
    }


def ini_config(log_file: Path) -> str:
    return textwrap.dedent(
        f"""\
        [loggers]
        keys=root

        [handlers]
        keys=file,console

        [formatters]
        keys=json,console

        [logger_root]
        level=INFO
        handlers=file,console

        [handler_file]
        class=FileHandler
        args=({str(log_file)!r},)
        formatter=json

        [handler_console]
        class=StreamHandler
        args=(sys.stderr,)
        formatter=console

        [formatter_json]
        class=asgi_resilience.JsonFormatter

        [formatter_console]
        format={CONSOLE_FORMAT}
        """
    )


def write_log_config(directory: Path, kind: str, log_file: Path) -> Path:
    if kind == "ini":
        path = directory / "logging.ini"
        path.write_text(ini_config(log_file))
    elif kind == "json":
        path = directory / "logging.json"
        path.write_text(json.dumps(dict_config(log_file)))
    else:
        yaml = pytest.importorskip("yaml")
        path = directory / "logging.yaml"
        path.write_text(yaml.safe_dump(dict_config(log_file)))
    return path


@pytest.mark.parametrize(
    ("kind", "server", "workers"),
    [
        ("json", "uvicorn", "1"),
        ("ini", "uvicorn", "2"),
        ("yaml", "uvicorn", "1"),
        ("json", "hypercorn", "2"),
        ("ini", "granian", "2"),
    ],
)
def test_run_log_config_carries_the_access_log_in_every_process(
    serve: Callable[..., Server], tmp_path: Path, kind: str, server: str, workers: str
) -> None:
    log_file = tmp_path / "service.log"
    config = write_log_config(tmp_path, kind, log_file)
    args = ("run", TARGET, "--log-config", str(config), "--server", server, "--workers", workers)
    served = serve(*args)
    # Every worker up (one answered readiness): a SIGTERM during a worker's startup is no
    # graceful stop, and each worker's own configuration is what this test is about.
    wait_for(lambda: served.stderr.count("Startup complete") == int(workers), served)
    hello = served.client.get("/hello", headers={"X-Request-ID": f"log-config-{kind}"})
    assert served.stop() == 0, served.stderr
    assert hello.status_code == 200
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    [access] = [r for r in records if r["logger"] == "asgi_resilience.access"]
    assert access["request_id"] == f"log-config-{kind}"
    assert (access["path"], access["status"], access["level"]) == ("/hello", 200, "INFO")
    assert served.stdout == ""  # neither our JSON lines nor the access log's sink on stdout
    console = served.stderr.splitlines()
    assert "console INFO asgi_resilience.access GET /hello 200" in "\n".join(console)
    assert not [line for line in console if line.startswith("{")]  # no JSON line of ours


def test_log_config_that_disables_existing_loggers_is_warned_about(tmp_path: Path) -> None:
    """``dictConfig`` disables every logger not named unless told not to: ours among them."""
    config = dict_config(tmp_path / "service.log")
    del config["disable_existing_loggers"]  # dictConfig's default: True
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    # A startup that fails ends the process by itself: the warning comes before it.
    target = "tests.apps.cli_checks:failing"
    uds = str(tmp_path / "service.sock")  # no port to find free: it never serves
    exit_code, _, stderr = run_command("run", target, "--log-config", str(path), "--uds", uds)
    assert exit_code == 3, stderr
    assert stderr.splitlines()[0] == (
        f"asgi-resilience: warning: --log-config {path} disabled the loggers that existed "
        "before it, asgi_resilience.access among them (kept on: asgi_resilience.lifespan): "
        'set "disable_existing_loggers": false'
    )
    # The lifespan's logger was disabled too, and kept on: the reason is said, once.
    for said in (stderr, (tmp_path / "service.log").read_text()):  # the config's two handlers
        assert said.count("payments-api refused the connection") == 1, said


def test_log_config_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert_usage_error(
        *run_command("run", TARGET, "--log-config", str(missing))[::2],
        f"cannot read --log-config '{missing}': No such file or directory",
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert_usage_error(
        *run_command("run", TARGET, "--log-config", str(broken))[::2],
        f"--log-config {broken}: JSONDecodeError: ",
    )
    bad_handler = tmp_path / "bad-handler.json"
    bad_handler.write_text(
        json.dumps({"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}})
    )
    assert_usage_error(
        *run_command("run", TARGET, "--log-config", str(bad_handler))[::2],
        f"--log-config {bad_handler}: ValueError: Unable to configure handler 'h' (",
        "No module named 'no'",
    )
    not_ini = tmp_path / "logging.conf"
    not_ini.write_text("[loggers]\nkeys=root\n")
    assert_usage_error(
        *run_command("run", TARGET, "--log-config", str(not_ini))[::2],
        f"--log-config {not_ini}: ",
    )


def test_yaml_log_config_without_pyyaml_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "logging.yml"
    path.write_text("version: 1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    with pytest.raises(cli.UsageError) as raised:
        apply_log_config(path)
    assert str(raised.value) == (
        f"--log-config {path} needs PyYAML: pip install pyyaml (uvicorn[standard] has it)"
    )


def test_log_config_and_plain_logs_exclude_each_other(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", TARGET, "--log-config", str(tmp_path / "x.json"), "--plain-logs"])
    assert exited.value.code == 2
    assert "not allowed with argument --log-config" in capsys.readouterr().err


def test_main_run_log_config_reaches_the_workers(fake_uvicorn: FakeUvicorn, tmp_path: Path) -> None:
    """The parent hands the configuration's absolute path to the workers; uvicorn is told
    nothing of logging (no level either: the configuration's stands)."""
    configured: list[str] = []

    def in_uvicorn() -> None:
        configured.append(os.environ["_ASGI_RESILIENCE_CLI_LOG_CONFIG"])

    fake_uvicorn.during = in_uvicorn
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({"version": 1, "disable_existing_loggers": False}))
    relative = os.path.relpath(config)
    argv = ["run", TARGET, "--log-config", relative, "--workers", "2", "--port", str(free_port())]
    assert cli.main(argv) == 0
    [(_, options)] = fake_uvicorn.calls
    assert options["log_config"] is None and options["log_level"] is None
    assert configured == [str(config.resolve())]


# -- --version ---------------------------------------------------------------------------------


def test_version() -> None:
    exit_code, stdout, stderr = run_command("--version")
    assert (exit_code, stdout, stderr) == (
        0,
        f"asgi-resilience {asgi_resilience.__version__}\n",
        "",
    )


# -- --uds and --root-path on each server ------------------------------------------------------


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "granian"])
def test_run_on_a_unix_socket_with_each_server(tmp_path: Path, server: str) -> None:
    socket_path = tmp_path / "service.sock"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*MODULE, "run", TARGET, "--uds", str(socket_path), "--server", server],
            cwd=ROOT,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    transport = httpx.HTTPTransport(uds=str(socket_path))
    try:
        wait_until_accepting(socket_path, process, log)
        with httpx.Client(transport=transport, base_url="http://service", timeout=10) as client:
            deadline = time.monotonic() + 15
            while client.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)  # another process: nothing to wait on but its answers
            hello = client.get("/hello")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.read_text()
    assert hello.json() == {"hello": "world"}


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "granian"])
def test_run_root_path_reaches_the_app(serve: Callable[..., Server], server: str) -> None:
    # Ready: the stack's own paths answer whether or not the server prefixes scope["path"]
    # with the root path (uvicorn does, Hypercorn and Granian do not).
    served = serve("run", FACTORY, "--factory", "--root-path", "/api", "--server", server)
    made = served.client.get("/made")
    metrics = served.client.get("/metrics")
    assert served.stop() == 0, served.stderr
    assert made.json()["root_path"] == "/api"
    assert metrics.status_code == 200


def test_main_run_hands_the_root_path_to_uvicorn(fake_uvicorn: FakeUvicorn) -> None:
    assert cli.main(["run", TARGET, "--root-path", "/api", "--port", str(free_port())]) == 0
    assert fake_uvicorn.calls[0][1]["root_path"] == "/api"


@pytest.mark.parametrize("root_path", ["api", "/api/", "/"])
def test_a_bad_root_path_is_refused(
    fake_uvicorn: FakeUvicorn, capsys: pytest.CaptureFixture[str], root_path: str
) -> None:
    assert cli.main(["run", TARGET, f"--root-path={root_path}"]) == 2
    assert capsys.readouterr().err == (
        "asgi-resilience: error: --root-path must start with / and not end with one (/api), "
        f"got {root_path!r}\n"
    )
    assert fake_uvicorn.calls == []


# -- help and defaults -------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def option_entries(help_text: str) -> dict[str, str]:
    """``--help``'s option entries, each on one line, by their first option string."""
    entries: dict[str, str] = {}
    name = None
    for line in help_text.splitlines():
        start = re.match(r"  (-{1,2}[\w-]+)", line)
        if start is not None:
            name = start[1]
            entries[name] = line.strip()
        elif name is not None and line.startswith("    "):
            entries[name] += " " + line.strip()
        else:
            name = None
    return entries


def test_every_option_of_every_command_has_help_and_shows_its_default() -> None:
    commands = subcommands()
    assert set(commands) == {"run", "check", "worker", "drain", "demo", "doctor"}
    for name, sub in commands.items():
        entries = option_entries(sub.format_help())
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help"
            if not action.option_strings or action.default == argparse.SUPPRESS:
                continue  # the target; -h
            entry = entries[action.option_strings[0]]
            assert "(default: " in entry, f"{name}: {entry}"
    run_help = option_entries(commands["run"].format_help())
    assert run_help["--port"].endswith("(default: 8000)")
    assert run_help["--host"].endswith("(default: 127.0.0.1)")
    assert run_help["--workers"].endswith("(default: 1)")
    assert run_help["--server"].endswith("(default: uvicorn)")
    assert run_help["--factory"].endswith("(default: off)")
    assert run_help["--uds"].endswith("(default: none)")
    assert "(default: info;" in run_help["--log-level"]
    assert option_entries(commands["drain"].format_help())["--timeout"].endswith("(default: 60.0)")


def test_help_shows_the_defaults() -> None:
    exit_code, stdout, _ = run_command("run", "--help")
    assert exit_code == 0
    assert "(default: 8000)" in stdout and "--log-config PATH" in stdout


# -- a failed startup, said once ---------------------------------------------------------------

REASON = "payments-api refused the connection"


def test_check_says_a_failed_checks_reason_once() -> None:
    exit_code, stdout, stderr = run_command("check", "tests.apps.cli_checks:failing")
    assert exit_code == 1
    assert f"{stdout}{stderr}".count(REASON) == 1
    assert table(stdout)["payments-api"][2] == f"ConnectionRefusedError: {REASON}"
    assert stdout.splitlines()[-1] == "startup failed: check 'payments-api' failed"


def test_check_says_in_full_a_failure_the_table_cannot_show() -> None:
    timed_out = StartupError("startup failed: timed out after 1s waiting for check 'search'")
    assert cli._failure_line(timed_out, set()) == str(timed_out)
    failures = tuple(CheckResult(name, False, 0.1, "boom") for name in ("a", "b"))
    both = StartupError("startup failed: ...", failures)
    assert cli._failure_line(both, {"a", "b"}) == "startup failed: checks 'a', 'b' failed"
    assert cli._failure_line(both, {"a"}) == "startup failed: ..."


@pytest.mark.parametrize(("server", "code"), [("uvicorn", 3), ("hypercorn", 3), ("granian", 1)])
@pytest.mark.parametrize("logs", [[], ["--plain-logs"]])
def test_run_says_a_failed_startups_reason_once(
    tmp_path: Path, server: str, code: int, logs: list[str]
) -> None:
    uds = str(tmp_path / "service.sock")  # no port to find free: it never serves
    command = ["run", "tests.apps.cli_checks:failing", "--server", server, "--uds", uds]
    exit_code, stdout, stderr = run_command(*command, *logs, timeout=30)
    output = f"{stdout}{stderr}"
    assert exit_code == code, output
    assert output.count(REASON) == 1, output
    assert "Traceback" not in output


# -- retried checks ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_retried_check_logs_each_failed_attempt_as_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan = Lifespan()
    answers = iter([False, True])

    @lifespan.check("flaky", attempts=2, timeout=1)
    async def flaky() -> bool:
        return next(answers)

    await lifespan.startup()
    await lifespan.shutdown()
    attempts = [r for r in caplog.records if "attempt" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in attempts] == [
        (logging.WARNING, "Check 'flaky' attempt 1/2 failed: returned False")
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.anyio
async def test_a_check_failing_every_attempt_ends_in_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lifespan = Lifespan()

    @lifespan.check("down", attempts=2, timeout=1)
    async def down() -> None:
        raise ConnectionRefusedError("down refused the connection")

    with pytest.raises(StartupError):
        await lifespan.startup()
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if "down" in r.getMessage()]
    assert levels == [
        (
            logging.WARNING,
            "Check 'down' attempt 1/2 failed: ConnectionRefusedError: down refused the connection",
        ),
        (
            logging.ERROR,
            "startup failed: check 'down' failed: ConnectionRefusedError: down refused the "
            "connection",
        ),
    ]


# -- make demo -------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize(
    ("variables", "listens"),
    [
        ([], "--host 127.0.0.1 --port 8000"),
        (["PORT=8001", "HOST=0.0.0.0"], "--host 0.0.0.0 --port 8001"),
    ],
)
def test_make_demo_takes_the_port_and_host(variables: list[str], listens: str) -> None:
    # Not the settings of a make this test may run under (make test): its own, alone.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert dry_run.stdout.splitlines()[-1] == f".venv/bin/asgi-resilience demo {listens}"
