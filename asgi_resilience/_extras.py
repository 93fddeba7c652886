"""What to install when an optional dependency is missing: one line naming the extra."""

from __future__ import annotations

from typing import NoReturn

from .exceptions import MissingExtra


def missing_extra(
    exc: ModuleNotFoundError, extra: str, what: str, packages: tuple[str, ...]
) -> NoReturn:
    """Raise ``exc`` again, or, when the module it could not find is one of ``packages`` (an
    optional dependency of ``extra``), a ``ModuleNotFoundError`` saying what to install:
    ``the Redis rate limit backend needs redis: pip install 'asgi-resilience[redis]'``. A missing
    module of anything else (a bug, a broken install of something unrelated) is not hidden.
    """
    missing = (exc.name or "").partition(".")[0]
    if missing not in packages:
        raise exc
    message = f"{what} needs {missing}: pip install 'asgi-resilience[{extra}]'"
    raise MissingExtra(message, name=exc.name) from None
