"""Litestar: route templates need nothing (its router writes ``scope["path_template"]``: a route
declared ``/items/{item_id:int}`` is ``/items/{item_id}``); an exception Litestar turns into its
own 500 reaches the stack through its ``after_exception`` hook::

    from asgi_resilience.integrations.litestar import after_exception

    app = resilient(Litestar(route_handlers=[...], after_exception=[after_exception]))

Litestar's ``HTTPException`` below 500 (a 404, a validation 400) is an answer, not a fault: it
is not reported.
"""

from __future__ import annotations

from typing import Any

from . import report_exception

__all__ = ["after_exception"]


async def after_exception(exception: Exception, scope: Any) -> None:
    """Litestar's ``after_exception`` hook: hand a 5xx exception to the stack."""
    from litestar.exceptions import HTTPException

    if isinstance(exception, HTTPException) and exception.status_code < 500:
        return
    report_exception(exception, scope)
