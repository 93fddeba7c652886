"""Route templates: the template of the route that handled a request (``/users/{user_id}``),
found from what the router left in the scope, with Mount and FastAPI include prefixes joined.
Private: ``RequestContext.route`` is the way in."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from .types import Scope

UNMATCHED_ROUTE = "<unmatched>"


# Route templates, per top-level router: id(route) -> (route, full template). Built once per
# router by walking its route tree, so Mount prefixes are joined without re-matching anything per
# request. Keyed by id() because Starlette's routers and routes define __eq__ and so are
# unhashable; a weak reference drops the table when its router goes away.
_RouteTable = dict[int, tuple[Any, str]]
_route_tables: dict[int, tuple[weakref.ref[Any], _RouteTable]] = {}


def route_template(scope: Scope) -> str:
    """The full route template for ``scope`` after routing; see ``RequestContext.route``."""
    route = scope.get("route")
    if route is None:
        # Litestar writes its template here ("/items/{item_id}", the type left out).
        template = scope.get("path_template")
        return template if isinstance(template, str) and template else UNMATCHED_ROUTE
    if isinstance(route, str):
        return route or UNMATCHED_ROUTE
    router = scope.get("router")
    table = _table_for(router)
    # FastAPI (0.16x) keeps included routers lazy: scope["route"] is the route as declared,
    # without the include prefixes; the selected inclusion is in its own scope entry.
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        inclusion = table.get(id(fastapi_scope.get("effective_route_context")))
        if inclusion is not None and inclusion[0] is fastapi_scope["effective_route_context"]:
            return inclusion[1]
    entry = table.get(id(route))
    if entry is None or entry[0] is not route:
        # Added after the table was built (walk again, once), or outside the router's tree.
        table = _table_for(router, rebuild=True)
        entry = table.get(id(route))
        if entry is None or entry[0] is not route:
            entry = (route, _template_of(route, ""))
            table[id(route)] = entry
    return entry[1]


def _table_for(router: Any, *, rebuild: bool = False) -> _RouteTable:
    key = id(router)
    found = _route_tables.get(key)
    if found is not None and found[0]() is router and not rebuild:
        return found[1]
    table: _RouteTable = {}
    _walk_routes(getattr(router, "routes", ()), "", table)
    try:
        ref = weakref.ref(router, lambda _: _route_tables.pop(key, None))
    except TypeError:
        return table  # None, or not weakly referenceable: walk again next time, never leak
    _route_tables[key] = (ref, table)
    return table


def _walk_routes(routes: Iterable[Any], prefix: str, table: _RouteTable) -> None:
    for route in routes:
        table[id(route)] = (route, _template_of(route, prefix))
        children = getattr(route, "routes", None)
        if children:
            _walk_routes(children, prefix + _mount_prefix(route), table)
        inclusions = getattr(route, "effective_route_contexts", None)
        if callable(inclusions):
            # A FastAPI included router: each inclusion knows its full path. A route included
            # twice is found by its inclusion first, by itself (first inclusion wins) second.
            for inclusion in inclusions():
                template = prefix + str(getattr(inclusion, "path_format", "") or "")
                table[id(inclusion)] = (inclusion, template)
                original = getattr(inclusion, "original_route", None)
                table.setdefault(id(original), (original, template))


def _template_of(route: Any, prefix: str) -> str:
    path_format = getattr(route, "path_format", None)
    if not isinstance(path_format, str):
        return UNMATCHED_ROUTE  # a Host, or a route type we do not know
    if getattr(route, "routes", None):
        # A Mount around a router: it is the route only when nothing inside matched.
        return UNMATCHED_ROUTE
    return prefix + path_format


def _mount_prefix(route: Any) -> str:
    path_format = getattr(route, "path_format", None)
    if not isinstance(path_format, str):
        return ""  # Host: no path of its own
    return path_format.removesuffix("/{path}")
