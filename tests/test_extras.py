"""A missing optional dependency is one line naming the extra to install, never a bare
``ModuleNotFoundError`` (each case in a fresh interpreter where the package cannot be found)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from asgi_resilience._extras import missing_extra
from tests.servers import free_port


def run_without(packages: list[str], code: str) -> subprocess.CompletedProcess[str]:
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in packages)
    script = f"import sys\n{blocked}{code}"
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )


WHAT = {"redis": "the Redis rate limit backend", "sqlalchemy": "asgi_resilience.sqlalchemy"}


@pytest.mark.parametrize(
    ("packages", "code", "extra", "missing"),
    [
        (
            ["redis"],
            "from asgi_resilience import resilient\n"
            "resilient(lambda s, r, w: None, rate_limit='5/second',"
            " rate_limit_backend='redis://127.0.0.1:6379/0', environ={})",
            "redis",
            "redis",
        ),
        (["hiredis"], "import asgi_resilience.ratelimit.redis", "redis", "hiredis"),
        (["sqlalchemy"], "import asgi_resilience.sqlalchemy", "sqlalchemy", "sqlalchemy"),
    ],
    ids=["redis-url", "hiredis", "sqlalchemy"],
)
def test_a_missing_extra_says_what_to_install(
    packages: list[str], code: str, extra: str, missing: str
) -> None:
    done = run_without(packages, code)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    what = WHAT[extra]
    install = f"pip install 'asgi-resilience[{extra}]'"
    assert last == f"asgi_resilience.exceptions.MissingExtra: {what} needs {missing}: {install}"
    assert "During handling of the above exception" not in done.stderr  # one error, not two


def test_the_rest_of_the_package_imports_without_any_extra() -> None:
    done = run_without(
        ["redis", "hiredis", "sqlalchemy", "uvicorn"],
        "import asgi_resilience, asgi_resilience.cli, asgi_resilience.structlog\n"
        "asgi_resilience.resilient(lambda s, r, w: None, rate_limit='5/second', environ={})",
    )
    assert done.returncode == 0, done.stderr


def test_a_missing_module_of_something_else_is_not_hidden() -> None:
    unrelated = ModuleNotFoundError("No module named 'yaml'", name="yaml")
    with pytest.raises(ModuleNotFoundError) as raised:
        missing_extra(unrelated, "redis", "the Redis rate limit backend", ("redis",))
    assert raised.value is unrelated
    inside = ModuleNotFoundError("No module named 'redis.asyncio'", name="redis.asyncio")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'asgi-resilience\[redis\]'") as e:
        missing_extra(inside, "redis", "the Redis rate limit backend", ("redis",))
    assert e.value.name == "redis.asyncio"


@pytest.mark.parametrize(
    ("command", "env"),
    [
        (["check", "tests.apps.hello:app"], {"ASGI_RESILIENCE_RATE_LIMIT": "5/second"}),
        (
            ["run", "tests.apps.hello:app", "--port", str(free_port())],
            {"ASGI_RESILIENCE_RATE_LIMIT": "5/second"},
        ),
        (["check", "tests.apps.redis_limited:app"], {}),
        (["doctor", "tests.apps.redis_limited:app"], {}),
    ],
    ids=["check-from-env", "run-from-env", "check-built-at-import", "doctor"],
)
def test_the_command_says_it_in_one_line_and_exits_2(
    command: list[str], env: dict[str, str]
) -> None:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_RESILIENCE_")}
    variables.update(env, ASGI_RESILIENCE_RATE_LIMIT_BACKEND="redis://127.0.0.1:6379/0")
    if "redis_limited" in command[1]:
        del variables["ASGI_RESILIENCE_RATE_LIMIT_BACKEND"]
    script = (
        "import sys\nsys.modules['redis'] = None\n"
        "from asgi_resilience.cli import main\n"
        f"sys.exit(main({command!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=variables
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "asgi-resilience: error: the Redis rate limit backend needs redis: "
        "pip install 'asgi-resilience[redis]'"
    ]
