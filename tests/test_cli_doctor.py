"""``asgi-resilience doctor``: one line per finding with its severity and fix, exit 1 on an
error, ``--factory``, one line and exit 2 for a bad target."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asgi_resilience.cli import main
from tests.servers import free_port

APPS = "tests.apps.doctor_apps"


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["doctor", *args])
    return code, capsys.readouterr().out.splitlines()


def test_a_clean_app_gets_only_ok_lines_and_exit_0(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    code, lines = doctor(
        capsys, f"{APPS}:clean", "--factory", "--workers", "4", "--served-by", "run"
    )
    assert code == 0
    *findings, summary = lines
    assert len(findings) == 8
    assert all(line.startswith("ok ") for line in findings), findings
    assert summary == "0 errors, 0 warnings"


def test_a_memory_rate_limit_under_workers_is_an_error_with_its_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, lines = doctor(
        capsys, f"{APPS}:memory_rate_limit", "--factory", "--workers", "4", "--served-by", "run"
    )
    assert code == 1
    [line] = [line for line in lines if "rate-limit-backend" in line]
    assert line.startswith("error    rate-limit-backend")
    assert "admits up to 4 times '100/minute'" in line
    assert "fix: rate_limit_backend='redis://host:6379/0'" in line
    assert lines[-1] == "1 error, 0 warnings"


def test_a_shutdown_longer_than_the_grace_period_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, lines = doctor(capsys, f"{APPS}:slow_shutdown", "--factory", "--grace-period", "60")
    assert code == 0  # 45 s fit in 60
    code, lines = doctor(capsys, f"{APPS}:slow_shutdown", "--factory", "--grace-period", "30")
    assert code == 1
    [line] = [line for line in lines if line.startswith("error")]
    assert "= 45 s, longer than the 30 s grace period" in line
    assert "terminationGracePeriodSeconds >= 50" in line


def test_a_plain_app_is_wrapped_from_the_environment_as_run_would(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASGI_RESILIENCE_RATE_LIMIT", "10/second")
    monkeypatch.setenv("ASGI_RESILIENCE_DEBUG", "true")
    monkeypatch.delenv("APP_ENV", raising=False)
    monkeypatch.delenv("ENVIRONMENT", raising=False)
    code, lines = doctor(capsys, f"{APPS}:plain", "--workers", "2")
    assert code == 1
    severities = {line.split()[1]: line.split()[0] for line in lines[:-1]}
    assert severities == {
        "debug": "error",
        "rate-limit-backend": "error",
        "trusted-proxies": "warning",
        "operational-endpoints": "warning",
        "shutdown-time": "ok",
        "startup-checks": "warning",
        "multiprocess-metrics": "error",
        "health-details": "ok",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch.module:app"], "no module named 'nosuch.module'"),
        ([f"{APPS}:clean"], "looks like an application factory; pass --factory"),
        ([f"{APPS}:plain", "--workers", "0"], "--workers must be at least 1"),
        ([f"{APPS}:plain", "--grace-period", "0"], "--grace-period must be a number of seconds"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "asgi_resilience.cli", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_management_port_refuses_an_app_that_cannot_take_it(workers: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asgi_resilience.cli",
            "run",
            "tests.apps.noenv:app",
            "--workers",
            workers,
            "--port",
            str(free_port()),
            "--management-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "was built with management_port=None" in line
    assert "ASGI_RESILIENCE_MANAGEMENT_PORT" in line


def test_check_runs_the_stacks_lifespan_and_the_frameworks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "tests.apps.two_lifespans:app"]) == 1
    out = capsys.readouterr().out
    assert "outer-dep refused the connection" in out
    assert out.splitlines()[-1] == "startup failed: check 'outer-dep' failed"
