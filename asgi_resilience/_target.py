"""What ``asgi-resilience run/check/worker`` serve: ``module:attribute``, imported and checked.

Every way a target can be wrong is one ``UsageError`` (one line, exit code 2), never a
traceback: a module that is missing or fails to import (its own error, and where in the user's
code it was raised), an attribute that is missing, not callable, a class, or a function that is
not an ASGI app (one taking no arguments is an application factory: ``--factory``). With
``factory`` the target is called with no arguments, as uvicorn's ``--factory`` calls it, and
what it returns is the app. An async factory is refused rather than awaited: it would build the
app on an event loop of its own, and whatever it bound to that loop (a client, a pool) would
fail on the server's.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any

from .calls import describe_error
from .exceptions import ConfigurationError, MissingExtra, UsageError
from .types import ASGIApp

__all__ = ["load_app", "load_target"]

_PACKAGE = Path(__file__).resolve().parent
# Where code that is not the user's lives: frames there do not say where the user's error is.
_LIBRARY_PATHS = ("stdlib", "platstdlib", "purelib", "platlib")
_NOT_USERS = (_PACKAGE, *{Path(sysconfig.get_paths()[key]).resolve() for key in _LIBRARY_PATHS})


def load_target(target: str, *, factory: bool = False) -> Any:
    """The object ``module:attribute`` names or, with ``factory``, what calling it returns."""
    found = _import_target(target)
    return _call_factory(target, found) if factory else found


def load_app(target: str, *, factory: bool = False) -> ASGIApp:
    """The ASGI app ``module:attribute`` names (with ``factory``: the one it returns).

    Raises:
        UsageError: the target cannot be imported or is not an ASGI app; the message says why.
    """
    app = load_target(target, factory=factory)
    problem = _asgi_problem(app, factory_hint=not factory)
    if problem is not None:
        subject = f"what {target} returned" if factory else target
        raise UsageError(f"{subject} {problem}")
    return app  # type: ignore[no-any-return]


def _import_target(target: str) -> Any:
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"expected module:attribute, got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as uvicorn does: modules next to you are found
    try:
        module = importlib.import_module(module_name)
    except (UsageError, ConfigurationError, MissingExtra):
        raise  # the stack's own configuration errors say what to fix already
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and _names_the_target(exc, module_name):
            raise UsageError(f"no module named {module_name!r}") from None
        raise UsageError(f"cannot import {module_name!r}: {_report(exc)}") from None
    found: Any = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return found


def _names_the_target(exc: ModuleNotFoundError, module_name: str) -> bool:
    """The missing module is the target or a package of it, not one the target imports."""
    missing = exc.name
    return missing is not None and (module_name == missing or module_name.startswith(missing + "."))


def _call_factory(target: str, factory: Any) -> Any:
    if not callable(factory):
        raise UsageError(f"{target} is not a factory: a {type(factory).__name__} is not callable")
    if _accepts(factory, 3) and not _accepts(factory, 0):
        raise UsageError(f"{target} is an ASGI app, not an application factory: drop --factory")
    try:
        app = factory()
    except (UsageError, ConfigurationError, MissingExtra):
        raise
    except Exception as exc:
        raise UsageError(f"{target} raised {_report(exc)}") from None
    if inspect.isawaitable(app):
        if inspect.iscoroutine(app):
            app.close()  # never awaited, on purpose: no "coroutine was never awaited" warning
        raise UsageError(
            f"{target} returned a coroutine: --factory takes a plain function that returns "
            "the app (an async factory would build it on an event loop other than the server's)"
        )
    return app


def _asgi_problem(app: Any, *, factory_hint: bool) -> str | None:
    """Why ``app`` is not an ASGI application, or ``None``. A class is callable, but calling it
    makes an instance, not a response; a function is judged by what its signature accepts."""
    if inspect.isclass(app):
        return "is a class, not an ASGI app: name an instance of it"
    if not callable(app):
        return f"is not an ASGI app: a {type(app).__name__} is not callable"
    if _accepts(app, 3) is not False:
        return None  # (scope, receive, send), or a builtin whose signature cannot be read
    if factory_hint and _accepts(app, 0):
        return "looks like an application factory; pass --factory"
    takes = ", ".join(inspect.signature(app).parameters)
    return f"is not an ASGI app: it takes ({takes}), an ASGI app takes (scope, receive, send)"


def _accepts(function: Any, count: int) -> bool | None:
    """Whether ``function`` can be called with ``count`` positional arguments; ``None`` when
    its signature cannot be read."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


def _report(exc: Exception) -> str:
    """``Type: message (file, line N)``: the error, and where in the user's code it was raised
    (a ``SyntaxError``'s message says where itself)."""
    if isinstance(exc, SyntaxError):
        return describe_error(exc)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_users(f.filename)]
    if not frames:
        return describe_error(exc)
    return f"{describe_error(exc)} ({_shown(frames[-1].filename)}, line {frames[-1].lineno})"


def _is_users(filename: str) -> bool:
    """Not the import machinery (``<frozen importlib._bootstrap>``), the standard library,
    an installed package or this package."""
    if filename.startswith("<"):
        return False
    path = Path(filename).resolve()
    return not any(path.is_relative_to(place) for place in _NOT_USERS)


def _shown(filename: str) -> str:
    path = Path(filename).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
