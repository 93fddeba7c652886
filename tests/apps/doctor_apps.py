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


def clean() -> ResilientApp:
    lifespan = Lifespan(drain_delay=5, shutdown_timeout=20)
    lifespan.add_check("database", _ping)
    return resilient(
        Starlette(),
        debug=False,
        lifespan=lifespan,
        rate_limit="100/minute",
        rate_limit_backend="redis://127.0.0.1:6379/0",
        trusted_proxies=["10.0.0.0/8"],
        management_port=9464,
    )


def memory_rate_limit() -> ResilientApp:
    lifespan = Lifespan(drain_delay=5, shutdown_timeout=20)
    lifespan.add_check("database", _ping)
    return resilient(
        Starlette(),
        debug=False,
        lifespan=lifespan,
        rate_limit="100/minute",
        trusted_proxies=["10.0.0.0/8"],
        management_port=9464,
    )


def slow_shutdown() -> ResilientApp:
    lifespan = Lifespan(drain_delay=20, shutdown_timeout=25)
    lifespan.add_check("database", _ping)
    return resilient(
        Starlette(),
        debug=False,
        lifespan=lifespan,
        trusted_proxies=["10.0.0.0/8"],
        management_port=9464,
    )
