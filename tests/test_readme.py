"""The README is true: every Python code block runs as written (each in a fresh interpreter,
the application it defines started and probed), every ``asgi-resilience`` command it shows
parses, and the options, extras, version and pictures it names exist."""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import asgi_resilience
from asgi_resilience import resilient
from asgi_resilience.cli import _parser
from tests.conftest import require_service

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()


def _blocks(languages: str) -> list[tuple[int, str]]:
    """The README's code blocks in those languages, each with the line it starts on."""
    pattern = re.compile(rf"^```(?:{languages})\n(.*?)^```", re.S | re.M)
    return [(TEXT.count("\n", 0, m.start()) + 1, m.group(1)) for m in pattern.finditer(TEXT)]


BLOCKS = _blocks("python")
SHELL_BLOCKS = [block for _, block in _blocks("console|bash|sh|shell")]

# The services a block needs, found by the URLs written in it: (pattern, default port, name).
# A block whose server is unreachable is skipped, or fails under CI=true (as the other tests
# needing these servers do).
SERVICES = (
    (re.compile(r"\bredis(?:s|\+cluster|\+sentinel)?://[^\s\"'),]+"), 6379, "Redis"),
    (re.compile(r"\bpostgres(?:ql)?(?:\+\w+)?://[^\s\"'),]+"), 5432, "PostgreSQL"),
)

# Runs a block, then exercises the application it defines: a module-level `app` is started
# (its lifespan: resources, checks, tasks), probed when it is a resilient() app (live and ready
# must answer 200), and stopped. A block that drives its app itself (a TestClient of its own)
# is only run.
DRIVER = """
import runpy, sys
from pathlib import Path

namespace = runpy.run_path(sys.argv[1], run_name="__main__")
app = namespace.get("app")
if app is not None and "TestClient(" not in Path(sys.argv[1]).read_text():
    from starlette.testclient import TestClient

    from asgi_resilience import ResilientApp

    with TestClient(app) as client:
        if isinstance(app, ResilientApp) and app.health is not None:
            for path in ("/livez", "/readyz"):
                response = client.get(path)
                assert response.status_code == 200, (path, response.status_code, response.text)
"""


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize(("line", "block"), BLOCKS, ids=[f"line {line}" for line, _ in BLOCKS])
def test_a_readme_example_runs_as_written(line: int, block: str, tmp_path: Path) -> None:
    for pattern, port, name in SERVICES:
        for url in pattern.findall(block):
            require_service(url, port, name)
    script = tmp_path / "example.py"
    script.write_text(block)
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"README.md line {line}:\n{done.stderr}"


def _commands() -> list[str]:
    """The `asgi-resilience ...` command lines of the README's shell blocks (in a block with
    `$ ` prompts, only the prompted lines: the others are output)."""
    commands = []
    for block in SHELL_BLOCKS:
        lines = block.splitlines()
        if any(line.startswith("$ ") for line in lines):
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        commands += [line.strip() for line in lines if line.strip().startswith("asgi-resilience")]
    return commands


COMMANDS = _commands()


def test_the_readme_shows_commands() -> None:
    shown = {shlex.split(command, comments=True)[1] for command in COMMANDS}
    assert shown >= {"run", "check", "worker", "drain", "demo"}


@pytest.mark.parametrize(
    "command", COMMANDS, ids=[shlex.join(shlex.split(c, comments=True)) for c in COMMANDS]
)
def test_a_readme_command_parses(command: str) -> None:
    argv = shlex.split(command, comments=True)[1:]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            _parser().parse_args(argv)
        except SystemExit as exit:
            if exit.code != 0:  # --version and --help exit 0 once they have printed
                pytest.fail(
                    f"{command!r} does not parse: {errors.getvalue().strip()}", pytrace=False
                )


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", TEXT, re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def test_the_stack_section_names_every_option_of_resilient() -> None:
    section = _section("The stack")
    options = set(inspect.signature(resilient).parameters) - {"app"}
    missing = sorted(option for option in options if f"`{option}" not in section)
    assert not missing, f"'The stack' does not name {missing}"


def test_the_installation_section_names_every_extra() -> None:
    section = _section("Installation")
    extras = set(importlib.metadata.metadata("asgi-resilience").get_all("Provides-Extra") or ())
    for extra in extras - {"dev", "bench"}:
        assert f"asgi-resilience[{extra}]" in section, extra


def test_the_readme_states_the_version() -> None:
    assert f"version {asgi_resilience.__version__}" in TEXT.lower()


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``."""
    headings = re.findall(
        r"^#+ (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M), re.M
    )
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_pictures_and_links_exist() -> None:
    for target in re.findall(r"\]\(((?!https?://)[^)\s]+)\)", TEXT):
        path, _, anchor = target.partition("#")
        linked = ROOT / path if path else README
        assert linked.exists(), target
        if anchor:
            assert anchor in _anchors(linked.read_text()), target
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
