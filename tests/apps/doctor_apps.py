"""Apps for ``asgi-resilience doctor`` (test_cli_doctor.py): a clean one, and one per mistake.

Each is a factory (``--factory``); ``plain`` is a bare Starlette app the command wraps itself
with ``resilient()`` from the environment, as ``run`` would.
"""

from __future__ import annotations

from starlette.applications import Starlette

from asgi_resilience import Lifespan, resilient
from asgi_resilience.stack import ResilientApp

plain = Starlette()


async def _ping() -> None:
    pass


def _configured(
    drain_delay: float = 5, shutdown_timeout: float = 20, **options: object
) -> ResilientApp:
    """A production-ready stack (a check, trusted proxies, a management port), changed by
    ``options``."""
    lifespan = Lifespan(drain_delay=drain_delay, shutdown_timeout=shutdown_timeout)
    lifespan.add_check("database", _ping)
    settings: dict[str, object] = {
        "debug": False,
        "lifespan": lifespan,
        "trusted_proxies": ["10.0.0.0/8"],
        "management_port": 9464,
        **options,
    }
    return resilient(Starlette(), **settings)  # type: ignore[arg-type]


def clean() -> ResilientApp:
    return _configured(rate_limit="100/minute", rate_limit_backend="redis://127.0.0.1:6379/0")


def memory_rate_limit() -> ResilientApp:
    return _configured(rate_limit="100/minute")


def slow_shutdown() -> ResilientApp:
    return _configured(drain_delay=20, shutdown_timeout=25)
