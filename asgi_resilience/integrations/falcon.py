"""Falcon (``falcon.asgi.App``): ``install(app)`` puts the matched ``uri_template``
(``/items/{item_id}``) into ``scope["route"]``, and hands an exception Falcon would turn into its
own 500 to the stack (an error handler for ``Exception``; ``HTTPError`` keeps Falcon's own)::

    from asgi_resilience.integrations.falcon import install

    falcon_app = falcon.asgi.App()
    install(falcon_app)
    app = resilient(falcon_app)
"""

from __future__ import annotations

from typing import Any

from . import report_exception, set_route

__all__ = ["install"]


class _RouteMiddleware:
    async def process_resource(self, req: Any, resp: Any, resource: Any, params: Any) -> None:
        if req.uri_template:
            set_route(req.scope, req.uri_template)


def install(app: Any) -> Any:
    """Hook ``app`` (a ``falcon.asgi.App``); returns it."""
    import falcon

    async def report(req: Any, resp: Any, exception: Exception, params: Any) -> None:
        report_exception(exception, req.scope)
        raise falcon.HTTPInternalServerError()  # Falcon's own 500, as without us

    app.add_middleware(_RouteMiddleware())
    app.add_error_handler(Exception, report)
    return app
