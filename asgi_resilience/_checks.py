"""Option checks shared by the middlewares and the lifespan: a wrong value is a ``ValueError``
that names the option and says what it takes, never a ``TypeError`` from deep inside."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any


def check_seconds(option: str, value: object, *, zero: bool = False) -> float:
    """``value`` as a finite number of seconds (> 0, or >= 0 with ``zero``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(
            f"{option} must be a number of seconds {bound} (such as 5 or 0.5), got {value!r}"
        )
    return float(value)


def check_bool(option: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 1, not ``"yes"``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be True or False, got {value!r}")
    return value


def check_count(option: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as a whole number >= ``minimum`` (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be a whole number >= {minimum}, got {value!r}")
    return value


def check_instance(option: str, value: object, kind: type, what: str) -> Any:
    """``value`` if it is ``None`` or a ``kind`` (``what``: how to name it in the error)."""
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{option} must be {what} or None, got {value!r}")
    return value


def check_logger(option: str, value: object, *, adapters: bool = True) -> Any:
    """``None``, a ``logging.Logger``, or (``adapters``: for code that only calls ``info``,
    ``warning``... on it) a ``logging.LoggerAdapter``."""
    if adapters and isinstance(value, logging.LoggerAdapter):
        return value
    what = "a logging.Logger or LoggerAdapter" if adapters else "a logging.Logger"
    return check_instance(option, value, logging.Logger, what)


def check_registry(option: str, value: object) -> Any:
    from prometheus_client import CollectorRegistry

    return check_instance(option, value, CollectorRegistry, "a prometheus_client CollectorRegistry")


def check_callable(option: str, value: object) -> Any:
    """``value`` if it is ``None`` or callable."""
    if value is not None and not callable(value):
        raise ValueError(f"{option} must be a callable or None, got {value!r}")
    return value


def check_mapping(option: str, value: object) -> Any:
    """``value`` if it is ``None`` or a mapping (of routes to values)."""
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"{option} must be a mapping of routes to values or None, got {value!r}")
    return value


def check_name(option: str, value: object) -> str:
    """``value`` if it is a non-empty string (a name shown in errors, logs and endpoints)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{option} must be a non-empty string, got {value!r}")
    return value
