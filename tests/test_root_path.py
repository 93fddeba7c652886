"""Behind ``--root-path`` (a proxy mounts the service under ``/api``), uvicorn puts the prefix
in front of ``scope["path"]``: the stack's own paths (health, metrics, exclusions, exempt paths,
route options) still mean what they mean to the app's router."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_resilience import resilient
from asgi_resilience.context import route_path
from asgi_resilience.types import Scope
from tests.asgi import call, http_scope

pytestmark = pytest.mark.anyio


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path})


def mounted(path: str, **kwargs: Any) -> Scope:
    scope = http_scope(f"/api{path}", **kwargs)
    scope["root_path"] = "/api"
    return scope


def service(**options: Any) -> Any:
    app = Starlette(routes=[Route("/items", item), Route("/internal/items", item)])
    return resilient(app, environ={}, registry=CollectorRegistry(), **options)


async def test_health_and_metrics_answer_under_the_root_path() -> None:
    app = service()
    async with LifespanManager(app):
        for path in ("/health/live", "/health/ready", "/metrics"):
            assert (await call(app, mounted(path))).status == 200, path
        assert (await call(app, mounted("/items"))).json() == {"path": "/api/items"}


async def test_exclusions_and_exempt_paths_apply_under_the_root_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = service(
        rate_limit="1/minute",
        rate_limit_exempt_paths=["/internal"],
        envelope=True,
        envelope_exclude_paths=["/internal"],
    )
    with caplog.at_level(logging.INFO, logger="asgi_resilience.access"):
        for _ in range(3):
            response = await call(app, mounted("/internal/items"))
            assert response.status == 200  # exempt from the limit
            assert response.json() == {"path": "/api/internal/items"}  # not enveloped
        await call(app, mounted("/health/live"))
    paths = [getattr(r, "path", None) for r in caplog.records if r.name == "asgi_resilience.access"]
    assert paths == ["/api/internal/items"] * 3  # the probe is not logged
    assert (await call(app, mounted("/items"))).json()["success"] is True
    assert (await call(app, mounted("/items"))).status == 429


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/api/health", "/api", "/health"),
        ("/api", "/api", "/"),
        ("/apis/health", "/api", "/apis/health"),  # not below the prefix
        ("/health", "/api", "/health"),  # a server that does not prefix
        ("/health", "", "/health"),
    ],
)
def test_route_path_follows_starlettes_rule(path: str, root_path: str, expected: str) -> None:
    scope = http_scope(path)
    scope["root_path"] = root_path
    assert route_path(scope) == expected
