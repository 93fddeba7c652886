"""Quart: ``install(app)`` puts the matched rule (``/items/<int:item_id>``, Quart's syntax) into
``scope["route"]`` before each request, and hands an exception Quart turns into its own 500 to
the stack (its ``got_request_exception`` signal)::

    from asgi_resilience.integrations.quart import install

    quart_app = Quart(__name__)
    install(quart_app)
    app = resilient(quart_app)
"""

from __future__ import annotations

from typing import Any

from . import report_exception, set_route

__all__ = ["install"]


def install(app: Any) -> Any:
    """Hook ``app`` (a ``quart.Quart``); returns it."""
    from quart import request
    from quart.signals import got_request_exception

    async def record_route() -> None:
        rule = request.url_rule
        if rule is not None:
            set_route(request.scope, rule.rule)  # type: ignore[arg-type]

    async def report(sender: Any, exception: BaseException, **extra: Any) -> None:
        report_exception(exception, request.scope)  # type: ignore[arg-type]

    app.before_request(record_route)
    got_request_exception.connect(report, app, weak=False)
    return app
