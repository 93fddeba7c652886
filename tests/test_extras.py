"""A missing optional dependency is one line naming the extra to install, never a bare
``ModuleNotFoundError`` (each case in a fresh interpreter where the package cannot be found)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asgi_resilience._extras import missing_extra


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
    assert (
        last
        == f"ModuleNotFoundError: {what} needs {missing}: pip install 'asgi-resilience[{extra}]'"
    )
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
