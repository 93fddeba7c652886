from __future__ import annotations

import os
import shutil
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import APIRouter, FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client import Counter as PrometheusCounter
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Exemplar, Sample
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route

from asgi_resilience import Lifespan, Metrics, MetricsMiddleware, metrics_app, resilient
from asgi_resilience.ratelimit import BackendError
from asgi_resilience.ratelimit.rates import Rate
from asgi_resilience.ratelimit.strategies import Decision, Strategy
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send
from tests.asgi import (
    Declined,
    add_item_endpoints,
    call,
    client_for,
    fastapi_app,
    http_scope,
    item_routes,
    read_item,
    starlette_app,
)
from tests.servers import start_uvicorn, wait_until_ready

pytestmark = pytest.mark.anyio

DURATION = "http_server_request_duration_seconds"
TTFB = "http_server_time_to_first_byte_seconds"
ACTIVE = "http_server_active_requests"
BODY_BYTES = "http_server_response_body_bytes"
EXCEPTIONS = "http_server_exceptions_total"
RATE_LIMIT_DECISIONS = "asgi_resilience_rate_limit_decisions_total"
STARTUP_CHECKS = "asgi_resilience_startup_check_duration_seconds"
SHUTDOWN_RESOURCES = "asgi_resilience_shutdown_resource_duration_seconds"
HEALTH_CHECK_UP = "asgi_resilience_health_check_up"
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what Prometheus asks for by default

# promtool lint problems that are not ours to fix (a client library's convention, say).
# Every problem is printed; one not listed here fails the test.
PROMTOOL_TOLERATED: tuple[str, ...] = ()


# -- reading the exposition --------------------------------------------------------------------


def parse(text: str) -> list[Sample]:
    """Every sample of a text-format (0.0.4) exposition."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def scrape_registry(registry: CollectorRegistry) -> list[Sample]:
    return parse(generate_latest(registry).decode())


def values(samples: Iterable[Sample], name: str, **labels: str) -> list[float]:
    """The values of the samples called ``name`` whose labels include ``labels``."""
    return [
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def value(samples: Iterable[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample matching, ``None`` when there is none."""
    found = values(samples, name, **labels)
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples, expected one"
    return found[0] if found else None


async def scrape(client: httpx.AsyncClient) -> list[Sample]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == TEXT_FORMAT
    return parse(response.text)


# -- applications under test -------------------------------------------------------------------


class StreamBroke(Exception):
    """Raised by a streaming body after the response started."""


def mounted_app() -> Starlette:
    return Starlette(routes=[Mount("/api", routes=[Mount("/v1", routes=item_routes())])])


def fastapi_router_app() -> FastAPI:
    router = APIRouter()
    add_item_endpoints(router)
    app = FastAPI()
    app.include_router(router, prefix="/api")
    return app


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw ASGI app: 200 and ``ok`` for any path, no route."""
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


class FailingBackend:
    """A rate limit backend that fails at once (Redis refusing connections)."""

    async def decide(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        raise BackendError("connection refused")

    async def aclose(self) -> None:
        pass


# -- route, method and status labels -----------------------------------------------------------


@pytest.mark.parametrize(
    ("make_app", "prefix"),
    [
        (starlette_app, ""),
        (mounted_app, "/api/v1"),
        (fastapi_app, ""),
        (fastapi_router_app, "/api"),
    ],
    ids=["starlette", "starlette-mounts", "fastapi", "fastapi-router"],
)
async def test_requests_are_labelled_by_route_template(
    make_app: Callable[[], ASGIApp], prefix: str
) -> None:
    registry = CollectorRegistry()
    app = resilient(make_app(), registry=registry)
    async with client_for(app) as client:
        paths = (f"{prefix}/items/1", f"{prefix}/items/2", "/no/such/path", f"{prefix}/fail")
        statuses = [(await client.get(path)).status_code for path in paths]
        samples = await scrape(client)
    assert statuses == [200, 200, 404, 500]
    route = f"{prefix}/items/{{item_id}}"
    names = {sample.name for sample in samples}
    for name in (f"{DURATION}_count", f"{TTFB}_count", ACTIVE, f"{BODY_BYTES}_count", EXCEPTIONS):
        assert name in names
    assert value(samples, f"{DURATION}_count", method="GET", route=route, status_code="200") == 2
    assert value(samples, f"{DURATION}_count", route="<unmatched>", status_code="404") == 1
    assert value(samples, f"{DURATION}_count", route=f"{prefix}/fail", status_code="500") == 1
    assert value(samples, f"{TTFB}_count", method="GET", route=route) == 2
    assert value(samples, f"{TTFB}_count", method="GET", route="<unmatched>") == 1
    assert value(samples, ACTIVE, method="GET") == 0
    body_bytes = value(samples, f"{BODY_BYTES}_sum", method="GET", route=route, status_code="200")
    assert body_bytes == len("item 1") + len("item 2")
    assert value(samples, EXCEPTIONS, route=f"{prefix}/fail", exception_type="Declined") == 1
    routes = {sample.labels["route"] for sample in samples if "route" in sample.labels}
    assert routes == {route, "<unmatched>", f"{prefix}/fail"}  # never a raw path


async def test_random_unmatched_paths_add_no_series() -> None:
    registry = CollectorRegistry()
    app = resilient(starlette_app(), registry=registry, access_log=False)
    assert (await call(app, http_scope("/warm-up"))).status == 404
    before = len(list(scrape_registry(registry)))
    for number in range(10_000):
        path = f"/{os.urandom(6).hex()}/{number}"
        assert (await call(app, http_scope(path))).status == 404
    samples = scrape_registry(registry)
    assert len(samples) == before
    assert value(samples, f"{DURATION}_count", route="<unmatched>", status_code="404") == 10_001


@pytest.mark.parametrize("method", ["PURGE", "FOO"])
async def test_unknown_methods_are_labelled_other(method: str) -> None:
    registry = CollectorRegistry()
    async with client_for(resilient(starlette_app(), registry=registry)) as client:
        response = await client.request(method, "/items/1")
        samples = await scrape(client)
    assert response.status_code == 405
    route = "/items/{item_id}"
    assert value(samples, f"{DURATION}_count", method="_OTHER", route=route) == 1
    assert value(samples, f"{TTFB}_count", method="_OTHER", route=route) == 1
    assert value(samples, ACTIVE, method="_OTHER") == 0
    assert {s.labels["method"] for s in samples if "method" in s.labels} == {"_OTHER"}


# -- what is measured: bytes, time to first byte, duration, exceptions --------------------------


async def test_streamed_body_bytes_and_time_to_first_byte() -> None:
    chunks = [b"a" * 1000, b"b" * 2000, b"c" * 3000]

    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for number, chunk in enumerate(chunks):
                if number:
                    await anyio.sleep(0.05)  # the server waits on something between chunks
                yield chunk

        return StreamingResponse(body(), media_type="text/plain")

    registry = CollectorRegistry()
    app = resilient(Starlette(routes=[Route("/stream", stream)]), registry=registry)
    async with client_for(app) as client:
        response = await client.get("/stream")
        samples = await scrape(client)
    assert "content-length" not in response.headers
    assert len(response.content) == 6000
    labels = {"method": "GET", "route": "/stream", "status_code": "200"}
    assert value(samples, f"{BODY_BYTES}_sum", **labels) == 6000
    assert value(samples, f"{BODY_BYTES}_bucket", le="1000.0", **labels) == 0
    assert value(samples, f"{BODY_BYTES}_bucket", le="10000.0", **labels) == 1
    ttfb = value(samples, f"{TTFB}_sum", method="GET", route="/stream")
    duration = value(samples, f"{DURATION}_sum", **labels)
    assert ttfb is not None and duration is not None
    assert duration - ttfb >= 0.09  # the two pauses come after the response started


async def test_background_task_time_is_not_request_time() -> None:
    async def done(request: Request) -> PlainTextResponse:
        return PlainTextResponse("done", background=BackgroundTask(anyio.sleep, 0.3))

    registry = CollectorRegistry()
    app = resilient(Starlette(routes=[Route("/done", done)]), registry=registry)
    async with client_for(app) as client:
        began = perf_counter()
        response = await client.get("/done")
        elapsed = perf_counter() - began
        samples = await scrape(client)
    assert response.text == "done"
    assert elapsed >= 0.3  # the background task did run within the request's ASGI call
    duration = value(samples, f"{DURATION}_sum", route="/done", status_code="200")
    assert duration is not None and duration < 0.1


async def test_exceptions_are_counted_by_type_even_after_the_response_started() -> None:
    async def declined(request: Request) -> PlainTextResponse:
        raise Declined("card declined")

    async def broken_stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first part"
            raise StreamBroke("upstream went away")

        return StreamingResponse(body(), media_type="text/plain")

    registry = CollectorRegistry()
    routes = [
        Route("/declined", declined),
        Route("/stream", broken_stream),
        Route("/ok", read_item),
    ]
    app = resilient(Starlette(routes=routes), registry=registry)
    assert (await call(app, http_scope("/declined"))).status == 500
    with pytest.raises(StreamBroke):
        await call(app, http_scope("/stream"))
    samples = scrape_registry(registry)
    assert value(samples, EXCEPTIONS, route="/declined", exception_type="Declined") == 1
    assert value(samples, EXCEPTIONS, route="/stream", exception_type="StreamBroke") == 1
    assert len(values(samples, EXCEPTIONS)) == 2
    assert value(samples, f"{DURATION}_count", route="/declined", status_code="500") == 1
    # The status label is what the client really got: the 200 had started.
    assert value(samples, f"{DURATION}_count", route="/stream", status_code="200") == 1
    assert value(samples, f"{BODY_BYTES}_sum", route="/stream") == len(b"first part")


async def test_pathsend_body_bytes_are_the_file_size(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    report.write_bytes(b"x" * 1234)

    async def download(request: Request) -> FileResponse:
        return FileResponse(report)

    registry = CollectorRegistry()
    app = MetricsMiddleware(Starlette(routes=[Route("/report", download)]), registry=registry)
    scope = http_scope("/report", extensions={"http.response.pathsend": {}})
    response = await call(app, scope)
    sent = [message["type"] for message in response.messages]
    assert sent == ["http.response.start", "http.response.pathsend"]
    samples = scrape_registry(registry)
    assert value(samples, f"{BODY_BYTES}_sum", route="/report", status_code="200") == 1234


# -- MetricsMiddleware alone -------------------------------------------------------------------


async def test_disconnect_before_any_status_is_499() -> None:
    async def client_left(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.disconnect"  # nothing left to answer

    async def disconnected() -> Message:
        return {"type": "http.disconnect"}

    registry = CollectorRegistry()
    app = MetricsMiddleware(client_left, registry=registry)
    response = await call(app, http_scope("/slow"), receive=disconnected)
    assert response.messages == []
    samples = scrape_registry(registry)
    assert value(samples, f"{DURATION}_count", route="<unmatched>", status_code="499") == 1
    assert value(samples, f"{BODY_BYTES}_sum", status_code="499") == 0
    assert sum(values(samples, f"{TTFB}_count")) == 0  # no response started
    assert values(samples, EXCEPTIONS) == []


async def test_client_gone_when_sending_the_status_is_499() -> None:
    # ASGI 2.4: send() on a closed connection raises an OSError subclass (the client left).
    class ClientDisconnected(OSError):
        pass

    async def closed_connection(message: Message) -> None:
        raise ClientDisconnected

    async def request() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    registry = CollectorRegistry()
    with pytest.raises(ClientDisconnected):
        await MetricsMiddleware(ok_app, registry=registry)(
            http_scope("/"), request, closed_connection
        )
    samples = scrape_registry(registry)
    assert value(samples, f"{DURATION}_count", status_code="499") == 1
    assert values(samples, f"{DURATION}_count", status_code="500") == []


async def test_cancelled_before_any_status_is_499() -> None:
    async def hangs(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep_forever()

    registry = CollectorRegistry()
    with anyio.move_on_after(0.01):
        await call(MetricsMiddleware(hangs, registry=registry), http_scope("/"))
    samples = scrape_registry(registry)
    assert value(samples, f"{DURATION}_count", status_code="499") == 1
    assert value(samples, ACTIVE, method="GET") == 0


async def test_exception_before_the_response_is_500() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    registry = CollectorRegistry()
    with pytest.raises(RuntimeError, match="boom"):
        await call(MetricsMiddleware(broken, registry=registry), http_scope("/"))
    samples = scrape_registry(registry)
    assert value(samples, f"{DURATION}_count", route="<unmatched>", status_code="500") == 1
    assert value(samples, EXCEPTIONS, route="<unmatched>", exception_type="RuntimeError") == 1
    assert sum(values(samples, f"{TTFB}_count")) == 0  # no response started
    assert value(samples, ACTIVE, method="GET") == 0


async def test_excluded_paths_are_not_measured() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(ok_app, registry=registry, exclude_paths=["/metrics", "/internal/"])
    for path in ("/metrics", "/metrics/", "/internal", "/internal/jobs", "/metricsx", "/"):
        assert (await call(app, http_scope(path))).status == 200
    assert values(scrape_registry(registry), f"{DURATION}_count") == [2]  # /metricsx and /


async def test_websocket_and_lifespan_scopes_pass_through() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    registry = CollectorRegistry()
    app = MetricsMiddleware(inner, registry=registry)
    for scope_type in ("websocket", "lifespan"):
        await app({"type": scope_type, "path": "/"}, call_receive, call_send)
    assert seen == ["websocket", "lifespan"]
    assert values(scrape_registry(registry), f"{DURATION}_count") == []


async def call_receive() -> Message:
    return {"type": "http.disconnect"}


async def call_send(message: Message) -> None:
    raise AssertionError(f"nothing should be sent, got {message}")


# -- metrics_app -------------------------------------------------------------------------------


async def test_metrics_app_answers_head_without_a_body() -> None:
    registry = CollectorRegistry()
    PrometheusCounter("jobs", "Jobs run.", registry=registry).inc()
    endpoint = metrics_app(registry)
    get = await call(endpoint, http_scope("/metrics"))
    head = await call(endpoint, http_scope("/metrics", method="HEAD"))
    assert get.status == head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == str(len(get.body))
    assert head.headers["content-type"] == get.headers["content-type"] == TEXT_FORMAT
    assert head.headers["cache-control"] == "no-store"
    assert value(parse(get.body.decode()), "jobs_total") == 1
    await endpoint({"type": "lifespan"}, call_receive, call_send)  # answers nothing


async def test_openmetrics_is_negotiated_with_trace_id_exemplars() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traced_registry, untraced_registry = CollectorRegistry(), CollectorRegistry()
    traced = resilient(starlette_app(), registry=traced_registry, tracer_provider=provider)
    untraced = resilient(starlette_app(), registry=untraced_registry, tracing=False)
    accept = {"accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
    async with client_for(traced) as client:
        await client.get("/items/1")
        response = await client.get("/metrics", headers=accept)
        plain = await client.get("/metrics")
    async with client_for(untraced) as client:
        await client.get("/items/1")
        untraced_response = await client.get("/metrics", headers=accept)
    provider.shutdown()
    [span] = exporter.get_finished_spans()
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert plain.headers["content-type"] == TEXT_FORMAT
    assert not plain.text.endswith("# EOF\n")
    assert duration_exemplars(response.text) == [{"trace_id": f"{span.context.trace_id:032x}"}]
    assert duration_exemplars(untraced_response.text) == []  # no span, no exemplar


def duration_exemplars(text: str) -> list[dict[str, str]]:
    families = openmetrics_parser.text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    exemplars: list[Exemplar] = [
        sample.exemplar
        for family in families
        if family.name == DURATION
        for sample in family.samples
        if sample.exemplar is not None
    ]
    return [exemplar.labels for exemplar in exemplars]


# -- the other parts of the stack --------------------------------------------------------------


async def test_rate_limit_decisions_are_counted_by_policy_and_outcome() -> None:
    registry = CollectorRegistry()
    limited = resilient(
        starlette_app(),
        registry=registry,
        rate_limit="2/minute",
        rate_limit_routes={"/fail": "5/minute"},
    )
    failing = FailingBackend()
    broken = resilient(
        starlette_app(), registry=registry, rate_limit="2/minute", rate_limit_backend=failing
    )
    async with client_for(limited) as client:
        statuses = [(await client.get("/items/1")).status_code for _ in range(3)]
        await client.get("/fail")
        for _ in range(3):  # neither limited nor counted
            assert (await client.get("/metrics")).status_code == 200
            assert (await client.get("/health/live")).status_code == 200
    async with client_for(broken) as client:
        assert (await client.get("/items/1")).status_code == 200  # allowed on backend errors
    assert statuses == [200, 200, 429]
    samples = scrape_registry(registry)
    decisions = RATE_LIMIT_DECISIONS
    assert value(samples, decisions, policy="default", outcome="allowed") == 2
    assert value(samples, decisions, policy="default", outcome="limited") == 1
    assert value(samples, decisions, policy="default", outcome="error") == 1
    assert value(samples, decisions, policy="/fail", outcome="allowed") == 1


async def test_startup_check_shutdown_resource_and_health_check_metrics() -> None:
    lifespan = Lifespan()

    async def database() -> None:
        pass

    async def search() -> None:
        raise ConnectionRefusedError("search is down")

    async def cache() -> None:
        await anyio.sleep_forever()

    async def broker_close() -> None:
        raise RuntimeError("broker close failed")

    async def stuck_close() -> None:
        await anyio.sleep_forever()

    @lifespan.resource("pool")
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    lifespan.add_check("database", database)
    lifespan.add_check("search", search, critical=False)
    lifespan.add_check("cache", cache, critical=False, readiness=False, timeout=0.05)
    lifespan.add_resource("broker", broker_close)
    lifespan.add_resource("stuck", stuck_close, timeout=0.05)
    registry = CollectorRegistry()
    app = resilient(Starlette(), lifespan=lifespan, registry=registry)  # registry set by resilient
    async with LifespanManager(app), client_for(app) as client:
        assert (await client.get("/health/ready")).status_code == 200  # search is not critical
        running = await scrape(client)
    stopped = scrape_registry(registry)
    checks = f"{STARTUP_CHECKS}_count"
    assert value(running, checks, check="database", outcome="ok") == 1
    assert value(running, checks, check="search", outcome="error") == 1
    assert value(running, checks, check="cache", outcome="timeout") == 1
    assert value(running, HEALTH_CHECK_UP, check="database") == 1
    assert value(running, HEALTH_CHECK_UP, check="search") == 0
    assert value(running, HEALTH_CHECK_UP, check="cache") is None  # not a readiness check
    resources = f"{SHUTDOWN_RESOURCES}_count"
    # Known before the first shutdown, exported at 0 (an increase() from there shows it).
    assert values(running, resources) == [0] * 9  # pool, broker, stuck: ok, error, timeout
    assert value(stopped, resources, resource="pool", outcome="ok") == 1
    assert value(stopped, resources, resource="broker", outcome="error") == 1
    assert value(stopped, resources, resource="stuck", outcome="timeout") == 1


# -- registries --------------------------------------------------------------------------------


def test_metrics_for_registry_is_one_object_per_registry() -> None:
    registry = CollectorRegistry()
    metrics = Metrics.for_registry(registry)
    assert Metrics.for_registry(registry) is metrics
    assert Metrics.for_registry(CollectorRegistry()) is not metrics
    assert Metrics.for_registry() is Metrics.for_registry(REGISTRY)
    assert MetricsMiddleware(ok_app, registry=registry).metrics is metrics
    assert Lifespan(registry=registry).metrics is metrics
    child = metrics.child(metrics.active_requests, "GET")
    assert metrics.child(metrics.active_requests, "GET") is child


async def test_apps_sharing_a_registry_share_its_collectors() -> None:
    registry = CollectorRegistry()
    apps = [resilient(starlette_app(), registry=registry, rate_limit="9/minute") for _ in range(2)]
    metrics = MetricsMiddleware(ok_app, registry=registry).metrics
    assert Lifespan(registry=registry).metrics is metrics  # nothing registered twice
    for app in apps:
        async with client_for(app) as client:
            assert (await client.get("/items/1")).status_code == 200
    async with client_for(apps[0]) as client:
        samples = await scrape(client)
    assert value(samples, f"{DURATION}_count", route="/items/{item_id}", status_code="200") == 2
    assert value(samples, RATE_LIMIT_DECISIONS, policy="default", outcome="allowed") == 2


async def test_apps_on_the_default_registry() -> None:
    # Other tests share the global REGISTRY: count this test's own route, before and after.
    route = "/default-registry/{item_id}"
    apps = [resilient(Starlette(routes=[Route(route, read_item)])) for _ in range(2)]
    apps.append(resilient(Starlette(routes=[Route(route, read_item)]), rate_limit="9/minute"))
    counts = f"{DURATION}_count"
    before = value(scrape_registry(REGISTRY), counts, route=route, status_code="200") or 0
    for app in apps:
        async with client_for(app) as client:
            assert (await client.get("/default-registry/1")).status_code == 200
    async with client_for(apps[0]) as client:
        after = value(await scrape(client), counts, route=route, status_code="200")
    assert after == before + 3


# -- promtool ----------------------------------------------------------------------------------


def promtool() -> str:
    """The promtool binary; skip without it, except under CI (``CI=true``), where it fails."""
    path = shutil.which("promtool")
    if path is not None:
        return path
    message = "promtool is not installed"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}, and CI=true requires it", pytrace=False)
    pytest.skip(message)


async def test_promtool_check_metrics_passes() -> None:
    binary = promtool()
    lifespan = Lifespan()

    async def database() -> None:
        pass

    lifespan.add_check("database", database)
    lifespan.add_resource("pool", lambda: None)
    registry = CollectorRegistry()
    app = resilient(starlette_app(), lifespan=lifespan, registry=registry, rate_limit="2/minute")
    async with LifespanManager(app), client_for(app) as client:
        for path in ("/items/1", "/items/2", "/items/3", "/nowhere", "/fail", "/health/ready"):
            await client.get(path)
        await client.request("PURGE", "/items/1")
    exposition = generate_latest(registry)
    assert b"asgi_resilience_shutdown_resource_duration_seconds_count" in exposition
    result = await anyio.run_process([binary, "check", "metrics"], input=exposition, check=False)
    output = (result.stdout + result.stderr).decode()
    print(output)
    problems = [
        line
        for line in output.splitlines()
        if line.strip() and not any(tolerated in line for tolerated in PROMTOOL_TOLERATED)
    ]
    assert problems == []
    assert result.returncode == 0 or (PROMTOOL_TOLERATED and result.returncode == 3), output


# -- multiprocess mode under a real server ------------------------------------------------------


def test_multiprocess_workers_are_summed_and_dead_workers_marked(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    server = start_uvicorn(
        "tests.apps.metered:app",
        *("--workers", "2", "--no-access-log"),
        log=tmp_path / "uvicorn.log",
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory)},
    )
    process, base_url, output = server.process, server.base_url, server.output
    try:
        wait_until_ready(base_url, process, output=output)  # the workers start after the bind
        pids: Counter[int] = Counter()
        sent = 0
        # Fresh connections, several at a time: the kernel hands them to both workers.
        limits = httpx.Limits(max_keepalive_connections=0)
        with (
            httpx.Client(base_url=base_url, timeout=10, limits=limits) as client,
            ThreadPoolExecutor(8) as pool,
        ):
            while len(pids) < 2 and sent < 800:
                answers = pool.map(lambda _: client.get("/pid").text, range(8))
                pids.update(int(text) for text in answers)
                sent += 8
            for _ in range(8):
                assert client.get("/health/ready").status_code == 200
            scraped = parse(client.get("/metrics").text)
        assert len(pids) == 2, f"one worker served all {sent} requests"
        assert sum(values(scraped, f"{DURATION}_count", route="/pid")) == sent
        assert value(scraped, ACTIVE, method="GET") == 0
        assert values(scraped, HEALTH_CHECK_UP, check="always-up") == [1]
        for pid in pids:
            assert (directory / f"gauge_livesum_{pid}.db").exists()
        assert any((directory / f"gauge_livemin_{pid}.db").exists() for pid in pids)
        returncode = server.stop(timeout=20)
    finally:
        server.kill()
    assert returncode in (0, -signal.SIGTERM), output()
    left = sorted(path.name for path in directory.glob("gauge_live*.db"))
    assert left == [], output()
    for pid in pids:  # counters and histograms outlive their worker, as they should
        assert (directory / f"histogram_{pid}.db").exists()


@pytest.mark.anyio
async def test_a_failed_startup_still_records_its_check_durations() -> None:
    from asgi_resilience import Lifespan, StartupError

    registry = CollectorRegistry()
    lifespan = Lifespan(registry=registry)
    lifespan.add_check("database", lambda: False)
    lifespan.add_check("cache", lambda: True)
    with pytest.raises(StartupError):
        await lifespan.startup()
    name = "asgi_resilience_startup_check_duration_seconds_count"
    assert registry.get_sample_value(name, {"check": "database", "outcome": "error"}) == 1
    assert registry.get_sample_value(name, {"check": "cache", "outcome": "ok"}) == 1
