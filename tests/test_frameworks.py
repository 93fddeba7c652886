"""Frameworks beyond Starlette: route templates in metrics, access log and span, and an exception
the framework turns into its own 500 logged once, counted and traced.

Each framework is the real one (installed by the dev extra), with its integration installed as
asgi_resilience.integrations documents; requests go through its own routing and error handling.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from asgi_resilience import resilient
from tests.apps.frameworks import FRAMEWORKS, build
from tests.asgi import client_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # these frameworks run on asyncio only


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
async def test_route_templates_reach_metrics_access_log_and_span(
    framework: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "asgi_resilience.access")
    app, template = build(framework)
    registry = CollectorRegistry()
    stack = resilient(app, registry=registry, tracer_provider=provider)
    async with client_for(stack) as client:
        response = await client.get("/items/7")
    assert response.status_code == 200
    assert response.json() == {"item": 7}
    count = registry.get_sample_value(
        "http_server_request_duration_seconds_count",
        {"method": "GET", "route": template, "status_code": "200"},
    )
    assert count == 1
    [access] = [r for r in caplog.records if r.name == "asgi_resilience.access"]
    assert access.route == template  # type: ignore[attr-defined]
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["http.route"] == template
    assert span.name == f"GET {template}"


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
async def test_an_exception_the_framework_renders_is_logged_once_counted_and_traced(
    framework: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = build(framework)
    registry = CollectorRegistry()
    stack = resilient(app, registry=registry, tracer_provider=provider)
    async with client_for(stack) as client:
        response = await client.get("/boom", headers={"x-request-id": f"{framework}-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["request_id"] == f"{framework}-1"
    assert "kaboom" not in response.text  # production: nothing of the cause
    logged = [
        r for r in caplog.records if r.name == "asgi_resilience.errors" and r.exc_info is not None
    ]
    assert len(logged) == 1
    [record] = logged
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert record.request_id == f"{framework}-1"  # type: ignore[attr-defined]
    assert record.getMessage() == (
        "Unhandled RuntimeError in GET /boom (rendered by the application's framework)"
    )
    counted = registry.get_sample_value(
        "http_server_exceptions_total", {"route": "/boom", "exception_type": "RuntimeError"}
    )
    assert counted == 1
    [span] = exporter.get_finished_spans()
    assert [event.name for event in span.events] == ["exception"]
    assert span.status.status_code.name == "ERROR"


async def test_litestar_answers_are_not_reported_as_faults(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = build("litestar")
    registry = CollectorRegistry()
    async with client_for(resilient(app, registry=registry)) as client:
        assert (await client.get("/nowhere")).status_code == 404
        assert (await client.post("/items/1")).status_code == 405
        assert (await client.get("/conflict")).status_code == 409  # the app's own mapping
    assert [r for r in caplog.records if r.name == "asgi_resilience.errors"] == []
    assert (
        registry.get_sample_value(
            "http_server_exceptions_total",
            {"route": "<unmatched>", "exception_type": "NotFoundException"},
        )
        is None
    )


def test_importing_the_package_pulls_in_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, asgi_resilience, asgi_resilience.integrations;"
        "print(sorted(m for m in ('litestar', 'quart', 'django', 'falcon', 'blacksheep')"
        " if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_under_a_real_server_too(framework: str, tmp_path: Path) -> None:
    import os

    import httpx

    from tests.servers import start_uvicorn, wait_until_ready

    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_RESILIENCE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    _, template = build(framework)
    server = start_uvicorn(
        f"tests.apps.frameworks:{framework}_served", "--factory", log=tmp_path / "log", env=env
    )
    try:
        wait_until_ready(server.base_url, server.process, output=server.output)
        with httpx.Client(base_url=server.base_url, timeout=5) as client:
            assert client.get("/items/7").json() == {"item": 7}
            boom = client.get("/boom", headers={"x-request-id": "real-1"})
            assert boom.status_code == 500
            assert boom.json()["request_id"] == "real-1"
            metrics = client.get("/metrics").text
    finally:
        server.kill()
    assert f'route="{template}",status_code="200"' in metrics
    assert (
        'http_server_exceptions_total{exception_type="RuntimeError",route="/boom"} 1.0' in metrics
    )
