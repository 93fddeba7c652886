from __future__ import annotations

import subprocess
import sys

import asgi_resilience


def test_all_is_complete_and_sorted() -> None:
    public = {
        name
        for name, member in vars(asgi_resilience).items()
        if not name.startswith("_")
        and type(member).__name__ != "module"
        and name != "annotations"  # from __future__
    }
    assert set(asgi_resilience.__all__) - {"__version__"} == public
    assert asgi_resilience.__all__ == sorted(asgi_resilience.__all__)


def test_every_exported_name_has_a_docstring() -> None:
    for name in asgi_resilience.__all__:
        member = getattr(asgi_resilience, name)
        if callable(member):
            assert member.__doc__, f"{name} has no docstring"


def test_import_pulls_in_no_extra() -> None:
    code = (
        "import sys, asgi_resilience\n"
        "extras = {'redis', 'sqlalchemy', 'uvicorn', 'aiosqlite', 'fastapi'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in extras))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"
