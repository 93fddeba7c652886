"""``resilient()`` options from the environment: ``ASGI_RESILIENCE_<OPTION>``.

Each option that is a plain value has a variable: ``ASGI_RESILIENCE_RATE_LIMIT="100/minute"``,
``ASGI_RESILIENCE_TRUSTED_PROXIES="10.0.0.0/8,127.0.0.1"``, ``ASGI_RESILIENCE_DEBUG=false``.
Values are parsed and validated when the app is built; a bad one raises ``ConfigurationError``
naming the variable and the value. Keyword arguments win over the environment. Options that are
objects (``lifespan``, ``registry``, ``tracer_provider``, ``access_logger``, ``access_log_sink``,
``rate_limit_routes``, a callable ``rate_limit_key``) have no variable.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from .exceptions import ConfigurationError as ConfigurationError
from .proxies import TrustedProxies
from .ratelimit.rates import parse_rates

__all__ = ["ENV_PREFIX", "ConfigurationError", "options_from_env", "variable_for"]

ENV_PREFIX = "ASGI_RESILIENCE_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"", "none", "off"})
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false (also 1/0, yes/no, on/off)")


def _optional_boolean(value: str) -> bool | None:
    return None if value.strip().lower() in ("", "auto") else _boolean(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError("expected a number of seconds such as 0.5") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("expected a positive number of seconds")
    return seconds


def _seconds_or_off(value: str) -> float | None:
    return None if value.strip().lower() in ("off", "none") else _seconds(value)


def _seconds_or_zero(value: str) -> float:
    try:
        if float(value) == 0:
            return 0.0
    except ValueError:
        pass  # _seconds says what is wrong
    return _seconds(value)


def _path(value: str) -> str:
    path = value.strip()
    if not path.startswith("/") or (len(path) > 1 and path.endswith("/")):
        raise ValueError("expected a path starting with '/' and not ending with it")
    return path


def _count_or_zero(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise ValueError("expected a whole number such as 100") from None
    if count < 0:
        raise ValueError("expected a whole number >= 0")
    return count


def _concurrency(value: str) -> int | str:
    if value.strip().lower() == "adaptive":
        return "adaptive"
    count = _count_or_zero(value)
    if count < 1:
        raise ValueError("expected a whole number >= 1 or 'adaptive'")
    return count


def _optional_path(value: str) -> str | None:
    return None if value.strip().lower() in _NONE else _path(value)


def _paths(value: str) -> tuple[str, ...]:
    return tuple(_path(part) for part in value.split(",") if part.strip())


def _rate_limit(value: str) -> str | None:
    if value.strip().lower() in _NONE:
        return None
    parse_rates(value)  # raises ValueError with the expected form
    return value.strip()


def _backend_url(value: str) -> str:
    scheme = value.strip().partition("://")[0].lower()
    if "://" not in value or scheme not in ("memory", "redis", "rediss", "unix"):
        raise ValueError("expected memory:// or a redis://host:port/db URL")
    return value.strip()


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.strip() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value.strip()

    return parse


def _key(value: str) -> str:
    key = value.strip()
    if key == "ip" or (key.lower().startswith("header:") and key[7:].strip()):
        return key
    raise ValueError("expected ip or header:<name>")


def _header_name(value: str) -> str:
    if not _HEADER_NAME.fullmatch(value.strip()):
        raise ValueError("expected an HTTP header name such as X-Request-ID")
    return value.strip()


def _proxies(value: str) -> tuple[str, ...]:
    proxies = tuple(part.strip() for part in value.split(",") if part.strip())
    TrustedProxies(proxies)  # raises ValueError naming the bad entry
    return proxies


def _text(value: str) -> str:
    return value.strip()


PARSERS: Mapping[str, Callable[[str], Any]] = {
    "debug": _optional_boolean,
    "envelope": _boolean,
    "request_ids": _boolean,
    "request_id_header": _header_name,
    "trust_incoming_request_id": _boolean,
    "access_log": _boolean,
    "access_log_exclude_paths": _paths,
    "slow_threshold": _seconds,
    "errors": _boolean,
    "envelope_exclude_paths": _paths,
    "health_path": _optional_path,
    "health_status_details": _boolean,
    "health_cache_ttl": _seconds_or_zero,
    "version": _text,
    "rate_limit": _rate_limit,
    "rate_limit_backend": _backend_url,
    "rate_limit_strategy": _choice("gcra", "fixed-window", "sliding-window"),
    "rate_limit_key": _key,
    "rate_limit_exempt_paths": _paths,
    "rate_limit_on_backend_error": _choice("allow", "deny"),
    "rate_limit_backend_timeout": _seconds,
    "trusted_proxies": _proxies,
    "forwarded_header": _choice("x-forwarded-for", "forwarded"),
    "metrics": _boolean,
    "metrics_path": _optional_path,
    "tracing": _boolean,
    "max_concurrency": _concurrency,
    "max_queue": _count_or_zero,
    "queue_timeout": _seconds,
    "max_lag": _seconds_or_off,
    "timeout": _seconds,
    "max_body_size": _count_or_zero,
}


def variable_for(option: str) -> str:
    """The environment variable of ``option``: ``rate_limit`` -> ``ASGI_RESILIENCE_RATE_LIMIT``."""
    return ENV_PREFIX + option.upper()


def options_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``resilient()`` options set in ``environ``, parsed and validated.

    Raises:
        ConfigurationError: naming the first variable whose value is bad, and why.
    """
    options: dict[str, Any] = {}
    for option, parse in PARSERS.items():
        variable = variable_for(option)
        if variable in environ:
            value = environ[variable]
            try:
                options[option] = parse(value)
            except ValueError as exc:
                raise ConfigurationError(f"{variable}={value!r}: {exc}") from None
    unknown = sorted(
        name
        for name in environ
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() not in PARSERS
    )
    if unknown:
        variables = [variable_for(option) for option in PARSERS]
        close = difflib.get_close_matches(unknown[0], variables, n=1, cutoff=0.8)
        if close:
            raise ConfigurationError(f"unknown setting {unknown[0]}: did you mean {close[0]}?")
        raise ConfigurationError(
            f"unknown setting {unknown[0]}: the variables are " + ", ".join(variables)
        )
    return options
