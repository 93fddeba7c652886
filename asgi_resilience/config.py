"""``resilient()`` options from the environment: ``ASGI_RESILIENCE_<OPTION>``.

Each option that is a plain value has a variable: ``ASGI_RESILIENCE_RATE_LIMIT="100/minute"``,
``ASGI_RESILIENCE_TRUSTED_PROXIES="10.0.0.0/8,127.0.0.1"``, ``ASGI_RESILIENCE_DEBUG=false``.
Values are parsed and validated when the app is built; a bad one raises ``ConfigurationError``
naming the variable and the value. Keyword arguments win over the environment. Options that are
objects (``lifespan``, ``on_error``, ``cors``, ``registry``, ``tracer_provider``,
``access_logger``, ``access_log_sink``, ``rate_limit_routes``, a callable ``rate_limit_key``)
have no variable.
"""

from __future__ import annotations

import difflib
import inspect
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from opentelemetry.trace import TracerProvider
from starlette.middleware.cors import CORSMiddleware

from ._checks import (
    check_bool,
    check_callable,
    check_instance,
    check_logger,
    check_mapping,
    check_registry,
    check_seconds,
)
from ._http import HEADER_NAME
from .access_log import JsonLinesSink
from .context import PROBE_PATHS
from .exceptions import ConfigurationError as ConfigurationError
from .lifespan import Lifespan
from .proxies import TrustedProxies
from .ratelimit.backends import BACKEND_SCHEMES
from .ratelimit.rates import parse_rates

__all__ = [
    "DEFAULTS",
    "ENV_PREFIX",
    "ConfigurationError",
    "Options",
    "options_from_env",
    "variable_for",
]

ENV_PREFIX = "ASGI_RESILIENCE_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"", "none", "off"})


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
    if "://" not in value or scheme not in BACKEND_SCHEMES:
        redis = ", ".join(f"{scheme}://" for scheme in BACKEND_SCHEMES[1:])
        raise ValueError(f"expected memory:// or a Redis URL ({redis})")
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
    if not HEADER_NAME.fullmatch(value.strip()):
        raise ValueError("expected an HTTP header name such as X-Request-ID")
    return value.strip()


def _proxies(value: str) -> tuple[str, ...]:
    proxies = tuple(part.strip() for part in value.split(",") if part.strip())
    TrustedProxies(proxies)  # raises ValueError naming the bad entry
    return proxies


def _networks(value: str) -> tuple[str, ...] | None:
    if value.strip().lower() in _NONE:
        return None
    networks = tuple(part.strip() for part in value.split(",") if part.strip())
    _check_networks("the entries", networks)
    return networks


def _check_networks(option: str, networks: Iterable[Any]) -> None:
    for network in networks:
        if isinstance(network, str) and network.strip().lower() == "unix":
            continue
        try:
            ipaddress.ip_network(str(network).strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"{option} must be IP addresses, CIDR networks (10.0.0.0/8) or 'unix', "
                f"got {network!r}"
            ) from None


def _port(value: str) -> int | None:
    if value.strip().lower() in _NONE:
        return None
    try:
        port = int(value)
    except ValueError:
        raise ValueError("expected a port number such as 9090 (off: none)") from None
    if not 0 <= port <= 65535:
        raise ValueError("expected a port number between 0 and 65535")
    return port


def _text(value: str) -> str:
    return value.strip()


# --- Checks of keyword values: a ValueError naming the option and what it takes -------------

Check = Callable[[str, Any], Any]  # (option, value) -> the value to keep (normalized)


def _is_optional_bool(option: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(
            f"{option} must be True, False or None (None: APP_ENV decides), got {value!r}"
        )
    return value


def _is_seconds(option: str, value: Any) -> float:
    return check_seconds(option, value)


def _is_seconds_or_zero(option: str, value: Any) -> float:
    return check_seconds(option, value, zero=True)


def _is_optional_seconds(option: str, value: Any) -> float | None:
    return None if value is None else check_seconds(option, value)


def _is_text(option: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{option} must be a string or None, got {value!r}")
    return value


def _is_header(option: str, value: Any) -> str:
    if not isinstance(value, str) or not HEADER_NAME.fullmatch(value.strip()):
        raise ValueError(
            f"{option} must be an HTTP header name such as X-Request-ID, got {value!r}"
        )
    return value


def _is_optional_path(option: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.startswith("/")):
        raise ValueError(f"{option} must be a path starting with '/', or None, got {value!r}")
    return value


def _is_paths(option: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"{option} must be a list of paths, e.g. ['/health'], got {value!r}")
    paths = tuple(value)
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"{option} entries must be paths starting with '/', got {path!r}")
    return paths


def _is_addresses(option: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(
            f"{option} must be a list of addresses or networks, e.g. ['10.0.0.0/8'], got {value!r}"
        )
    addresses = tuple(value)
    try:
        TrustedProxies(addresses)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(
            message if message.startswith(option) else f"{option}: {message}"
        ) from None
    return addresses


def _is_optional_networks(option: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(
            f"{option} must be a list of networks, e.g. ['10.0.0.0/8'], or None, got {value!r}"
        )
    networks = tuple(value)
    if not all(isinstance(network, str) for network in networks):
        raise ValueError(f"{option} entries must be strings such as '10.0.0.0/8', got {value!r}")
    _check_networks(f"{option} entries", networks)
    return networks


def _is_optional_port(option: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(
            f"{option} must be a port number (0-65535; 0: any free port) or None, got {value!r}"
        )
    return value


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


def _is_host(option: str, value: Any) -> str:
    """An IP address (``0.0.0.0``, ``::``, ``127.0.0.1``) or a host name (``localhost``)."""
    host = value.strip() if isinstance(value, str) else None
    if host:
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            if _HOSTNAME.fullmatch(host) and not host.replace(".", "").isdigit():
                return host
    raise ValueError(
        f"{option} must be an address to listen on, such as '0.0.0.0', '::' or '127.0.0.1' "
        f"(no brackets, no port), got {value!r}"
    )


def _is_rate_limit(option: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{option} must be a limit such as '100/minute', or None, got {value!r}")
    try:
        parse_rates(value)
    except ValueError as exc:
        raise ValueError(f"{option}={value!r}: {exc}") from None
    return value


def _is_backend(option: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return _backend_url(value)
        except ValueError:
            pass
    elif callable(getattr(value, "decide", None)):
        return value
    raise ValueError(f"{option} must be 'memory://', a redis:// URL or a Backend, got {value!r}")


def _is_key(option: str, value: Any) -> Any:
    if callable(value) or (isinstance(value, str) and value in ("ip", "user")):
        return value
    if isinstance(value, str) and value.lower().startswith("header:") and value[7:].strip():
        return value
    raise ValueError(f"{option} must be 'ip', 'user', 'header:<name>' or a callable, got {value!r}")


def _is_one_of(*choices: str) -> Check:
    def check(option: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(
                f"{option} must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value

    return check


def _is_a(kind: type, what: str) -> Check:
    """``None`` or a ``kind`` (``check_instance``, as a check of one option)."""

    def check(option: str, value: Any) -> Any:
        return check_instance(option, value, kind, what)

    return check


def _is_access_logger(option: str, value: Any) -> Any:
    return check_logger(option, value, adapters=False)  # records go to its handle()


def _is_concurrency(option: str, value: Any) -> Any:
    if value is None or value == "adaptive":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a whole number >= 1, 'adaptive' or None, got {value!r}")
    return value


def _is_count(option: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{option} must be a whole number >= 0 or None, got {value!r}")
    return value


# What Starlette's CORSMiddleware takes besides the app, read from its signature.
_CORS_OPTIONS = frozenset(
    name
    for name in inspect.signature(CORSMiddleware.__init__).parameters
    if name not in ("self", "app")
)
_CORS_LISTS = ("allow_origins", "allow_methods", "allow_headers", "expose_headers")
_CORS_FLAGS = ("allow_credentials", "allow_private_network")
# What a browser sends as Origin: scheme://host[:port], nothing after it.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", re.IGNORECASE)


def _is_cors(option: str, value: Any) -> Any:
    """``None`` or the keyword arguments of Starlette's ``CORSMiddleware``, checked here: it
    would take a string of origins as a list of one-letter origins, a truthy string as
    ``allow_credentials=True``, and fail on an unknown key or a bad regex only at the first
    request (or not at all: an origin with a path never matches a browser's)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{option} must be a dict of CORSMiddleware options, e.g. "
            f"{{'allow_origins': ['https://app.example']}}, got {value!r}"
        )
    for key in value:
        if key not in _CORS_OPTIONS:
            close = difflib.get_close_matches(str(key), _CORS_OPTIONS, n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else "it takes " + ", ".join(sorted(_CORS_OPTIONS))
            )
            raise ValueError(f"{option}: unknown CORSMiddleware option {key!r}: {hint}")
    for key in _CORS_LISTS:
        entries = value.get(key, ())
        if isinstance(entries, str | bytes) or not isinstance(entries, Iterable):
            raise ValueError(
                f"{option}[{key!r}] must be a list, e.g. [{entries!r}], got {entries!r}"
            )
        if not all(isinstance(entry, str) for entry in entries):
            raise ValueError(f"{option}[{key!r}] entries must be strings, got {entries!r}")
    for origin in value.get("allow_origins", ()):
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ValueError(
                f"{option}['allow_origins']: {origin!r} can never match a browser's Origin: "
                "give scheme://host[:port] with no path (https://app.example), or '*'"
            )
    for key in _CORS_FLAGS:
        if key in value and not isinstance(value[key], bool):
            raise ValueError(f"{option}[{key!r}] must be True or False, got {value[key]!r}")
    max_age = value.get("max_age", 600)
    if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0:
        raise ValueError(f"{option}['max_age'] must be whole seconds >= 0, got {max_age!r}")
    regex = value.get("allow_origin_regex")
    if regex is not None:
        if not isinstance(regex, str):
            raise ValueError(f"{option}['allow_origin_regex'] must be a string, got {regex!r}")
        try:
            re.compile(regex)
        except re.error as exc:
            raise ValueError(f"{option}['allow_origin_regex'] {regex!r}: {exc}") from None
    if not value.get("allow_origins") and not regex:
        raise ValueError(
            f"{option} allows no origin: give allow_origins (['https://app.example'], or "
            "['*'] for any) or allow_origin_regex"
        )
    return dict(value)


def _about(check: Check, env: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """An option's metadata: how a keyword value is checked, how its variable is parsed."""
    return {"check": check, "env": env}


@dataclass(frozen=True)
class Options:
    """The options of ``resilient()``, each declared once: its default, how a keyword value is
    checked (a ``ValueError`` naming the option and what it takes) and, for the plain values,
    how its ``ASGI_RESILIENCE_<OPTION>`` variable is parsed. ``resilient()``'s docstring says
    what each option does; its signature lists the same names, in this order (a test keeps
    them so). Iterable values are kept as tuples."""

    debug: bool | None = field(default=None, metadata=_about(_is_optional_bool, _optional_boolean))
    envelope: bool = field(default=False, metadata=_about(check_bool, _boolean))
    request_ids: bool = field(default=True, metadata=_about(check_bool, _boolean))
    request_id_header: str = field(
        default="X-Request-ID", metadata=_about(_is_header, _header_name)
    )
    trust_incoming_request_id: bool = field(default=True, metadata=_about(check_bool, _boolean))
    access_log: bool = field(default=True, metadata=_about(check_bool, _boolean))
    access_logger: Any = field(default=None, metadata=_about(_is_access_logger))
    access_log_sink: Any = field(
        default=None, metadata=_about(_is_a(JsonLinesSink, "a JsonLinesSink"))
    )
    access_log_exclude_paths: tuple[str, ...] = field(
        default=PROBE_PATHS, metadata=_about(_is_paths, _paths)
    )
    slow_threshold: float = field(default=1.0, metadata=_about(_is_seconds, _seconds))
    errors: bool = field(default=True, metadata=_about(check_bool, _boolean))
    on_error: Any = field(default=None, metadata=_about(check_callable))
    cors: Any = field(default=None, metadata=_about(_is_cors))
    envelope_exclude_paths: tuple[str, ...] = field(default=(), metadata=_about(_is_paths, _paths))
    lifespan: Any = field(default=None, metadata=_about(_is_a(Lifespan, "a Lifespan")))
    health_path: str | None = field(
        default="/health", metadata=_about(_is_optional_path, _optional_path)
    )
    health_status_details: bool = field(default=False, metadata=_about(check_bool, _boolean))
    health_cache_ttl: float = field(
        default=1.0, metadata=_about(_is_seconds_or_zero, _seconds_or_zero)
    )
    version: str | None = field(default=None, metadata=_about(_is_text, _text))
    rate_limit: str | None = field(default=None, metadata=_about(_is_rate_limit, _rate_limit))
    rate_limit_backend: Any = field(default="memory://", metadata=_about(_is_backend, _backend_url))
    rate_limit_strategy: Literal["gcra", "fixed-window", "sliding-window"] = field(
        default="gcra",
        metadata=_about(
            _is_one_of("gcra", "fixed-window", "sliding-window"),
            _choice("gcra", "fixed-window", "sliding-window"),
        ),
    )
    rate_limit_key: Any = field(default="ip", metadata=_about(_is_key, _key))
    rate_limit_routes: Any = field(default=None, metadata=_about(check_mapping))
    rate_limit_exempt_paths: tuple[str, ...] = field(default=(), metadata=_about(_is_paths, _paths))
    rate_limit_on_backend_error: Literal["allow", "deny"] = field(
        default="allow", metadata=_about(_is_one_of("allow", "deny"), _choice("allow", "deny"))
    )
    rate_limit_backend_timeout: float = field(default=0.05, metadata=_about(_is_seconds, _seconds))
    trusted_proxies: tuple[str, ...] = field(default=(), metadata=_about(_is_addresses, _proxies))
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = field(
        default="x-forwarded-for",
        metadata=_about(
            _is_one_of("x-forwarded-for", "forwarded"),
            _choice("x-forwarded-for", "forwarded"),
        ),
    )
    operational_allow: tuple[str, ...] | None = field(
        default=None, metadata=_about(_is_optional_networks, _networks)
    )
    management_port: int | None = field(default=None, metadata=_about(_is_optional_port, _port))
    management_host: str = field(default="0.0.0.0", metadata=_about(_is_host, _text))
    metrics: bool = field(default=True, metadata=_about(check_bool, _boolean))
    metrics_path: str | None = field(
        default="/metrics", metadata=_about(_is_optional_path, _optional_path)
    )
    registry: Any = field(default=None, metadata=_about(check_registry))
    tracing: bool = field(default=True, metadata=_about(check_bool, _boolean))
    tracer_provider: Any = field(
        default=None, metadata=_about(_is_a(TracerProvider, "a TracerProvider"))
    )
    max_concurrency: Any = field(default=None, metadata=_about(_is_concurrency, _concurrency))
    max_queue: int | None = field(default=None, metadata=_about(_is_count, _count_or_zero))
    queue_timeout: float = field(default=1.0, metadata=_about(_is_seconds, _seconds))
    max_lag: float | None = field(
        default=0.1, metadata=_about(_is_optional_seconds, _seconds_or_off)
    )
    timeout: float | None = field(
        default=None, metadata=_about(_is_optional_seconds, _seconds_or_off)
    )
    timeout_routes: Any = field(default=None, metadata=_about(check_mapping))
    max_body_size: int | None = field(default=None, metadata=_about(_is_count, _count_or_zero))
    body_limit_routes: Any = field(default=None, metadata=_about(check_mapping))

    def __post_init__(self) -> None:
        for option in fields(self):
            value = option.metadata["check"](option.name, getattr(self, option.name))
            object.__setattr__(self, option.name, value)


# What each plain option's variable is parsed with: declared with the option, above.
PARSERS: Mapping[str, Callable[[str], Any]] = {
    option.name: option.metadata["env"] for option in fields(Options) if option.metadata["env"]
}
DEFAULTS: Mapping[str, Any] = {option.name: option.default for option in fields(Options)}


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
