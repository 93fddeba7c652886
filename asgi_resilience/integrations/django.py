"""Django: add ``"asgi_resilience.integrations.django.RouteMiddleware"`` to ``MIDDLEWARE``. It puts
the matched URL pattern (``/items/<int:item_id>``, Django's syntax, with a leading ``/``) into
``scope["route"]``, and hands an exception Django turns into its own 500 to the stack (its
``got_request_exception`` signal)::

    MIDDLEWARE = ["asgi_resilience.integrations.django.RouteMiddleware", ...]

    application = resilient(get_asgi_application())

Works with sync and async views, under ASGI only (a WSGI request has no scope).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from . import report_exception, set_route

__all__ = ["RouteMiddleware"]


def _report(sender: Any, request: Any = None, **extra: Any) -> None:
    exception = sys.exc_info()[1]  # sent from inside Django's except block
    scope = getattr(request, "scope", None)
    if exception is not None and isinstance(scope, dict):
        report_exception(exception, scope)


class RouteMiddleware:
    """Django middleware (sync and async capable): the route template into the scope."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction
        from django.core.signals import got_request_exception

        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)
        got_request_exception.connect(_report, dispatch_uid="asgi_resilience")

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)  # a coroutine when the chain is async

    def process_view(self, request: Any, view: Any, args: Any, kwargs: Any) -> None:
        match = getattr(request, "resolver_match", None)
        scope = getattr(request, "scope", None)
        if match is not None and isinstance(scope, dict):
            set_route(scope, match.route)
