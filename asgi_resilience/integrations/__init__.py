"""Integrations for frameworks that keep the matched route, or an exception they rendered as their
own 500, on their request objects instead of in the ASGI scope.

Starlette, FastAPI and Litestar need none: their routers leave the route in the scope
(``scope["route"]``, Litestar's ``scope["path_template"]``). For the others,
``asgi_resilience.integrations.<framework>`` (``quart``, ``django``, ``falcon``, ``blacksheep``,
and ``litestar`` for exceptions) does two things, in the framework's own terms:

- puts the route template into ``scope["route"]`` (``set_route``), in the framework's own syntax
  (``/items/<int:item_id>`` for Quart, ``/items/{item_id}`` for Falcon...), so that metrics, the
  access log and the span are labelled by route instead of ``<unmatched>``;
- hands an exception the framework caught and turned into its own 500 to the stack
  (``report_exception``): the error layer logs it once with its traceback and request id, the
  metrics count it, the span records it. The framework's 500 body is replaced as always.

Each module imports its framework only when used; ``import asgi_resilience`` never does.
"""

from __future__ import annotations

from typing import Any

from ..context import CONTEXT_KEY, RequestContext
from ..types import Scope

__all__ = ["report_exception", "set_route"]


def set_route(scope: Scope, template: Any) -> None:
    """Record ``template`` (a non-empty string) as the route that handles this request."""
    if isinstance(template, bytes):
        template = template.decode("utf-8", "replace")
    if isinstance(template, str) and template:
        scope["route"] = template if template.startswith("/") else f"/{template}"


def report_exception(exc: BaseException, scope: Scope | None = None) -> None:
    """Tell the stack that ``exc`` ended the request in ``scope`` (the current one by default),
    though the framework caught it and answered with its own 500."""
    context = scope.get(CONTEXT_KEY) if scope is not None else RequestContext.current()
    if isinstance(context, RequestContext):
        context.report_handled_exception(exc)
