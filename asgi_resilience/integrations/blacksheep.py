"""BlackSheep: ``install(app)`` (before the app starts) puts the matched route pattern
(``/items/{item_id}``) into ``scope["route"]``, and hands an exception BlackSheep turns into its
own 500 to the stack (around its ``log_unhandled_exc``)::

    from asgi_resilience.integrations.blacksheep import install

    blacksheep_app = Application()
    install(blacksheep_app)
    app = resilient(blacksheep_app)

The pattern is found by matching the request against the router once more in a middleware
(BlackSheep does not hand the match to middlewares): one extra route lookup per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from . import report_exception, set_route

__all__ = ["install"]


def install(app: Any) -> Any:
    """Hook ``app`` (a ``blacksheep.Application``); returns it."""
    router = app.router

    async def record_route(request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        match = router.get_match(request)
        if match is not None and request.scope is not None:
            set_route(request.scope, match.pattern)
        return await handler(request)

    logged = app.log_unhandled_exc

    async def log_unhandled_exc(request: Any, exc: Exception) -> None:
        if request.scope is not None:
            report_exception(exc, request.scope)
        await logged(request, exc)

    app.middlewares.insert(0, record_route)
    app.log_unhandled_exc = log_unhandled_exc
    return app
