"""RateLimitMiddleware and resilient(rate_limit=...): headers, 429s, keys, costs, proxies."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.authentication import SimpleUser, UnauthenticatedUser
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from asgi_resilience import resilient
from asgi_resilience.proxies import TrustedProxies
from asgi_resilience.ratelimit import (
    Backend,
    BackendError,
    Decision,
    MemoryBackend,
    Rate,
    RateLimitMiddleware,
    Strategy,
    StrategyName,
)
from asgi_resilience.types import ASGIApp, Message, Receive, Scope, Send
from tests.asgi import Response, call, http_scope
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

T0 = 1_080_000.0  # a whole number of hours: fixed windows start here
PEER = "203.0.113.5"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def backend(clock: FakeClock) -> MemoryBackend:
    return MemoryBackend(clock=clock)


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


async def json_app(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def request(
    app: ASGIApp,
    path: str = "/",
    *,
    peer: str | None = PEER,
    headers: Sequence[tuple[bytes, bytes]] = (),
    method: str = "GET",
    **extra: Any,
) -> Response:
    scope = http_scope(path, method=method, headers=headers)
    scope["client"] = (peer, 50000) if peer is not None else None
    scope.update(extra)
    return await call(app, scope)


# --- RFC 8941 structured fields, as far as RateLimit and RateLimit-Policy use them ------------

SFValue = int | float | str | bool
_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_DECIMAL = re.compile(r"-?\d{1,12}\.\d{1,3}")
_INTEGER = re.compile(r"-?\d{1,15}")
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~:/0-9A-Za-z]*")


def _bare_item(text: str) -> tuple[SFValue, str]:
    if match := _STRING.match(text):
        return re.sub(r"\\(.)", r"\1", match.group(1)), text[match.end() :]
    if match := _DECIMAL.match(text):
        return float(match.group()), text[match.end() :]
    if match := _INTEGER.match(text):
        return int(match.group()), text[match.end() :]
    if text.startswith(("?0", "?1")):
        return text[1] == "1", text[2:]
    if match := _TOKEN.match(text):
        return match.group(), text[match.end() :]
    raise ValueError(f"no bare item at {text!r}")


def parse_sf_list(value: str) -> list[tuple[str, dict[str, SFValue]]]:
    """A structured-field List of String Items with Parameters, parsed strictly."""
    items: list[tuple[str, dict[str, SFValue]]] = []
    rest = value.strip(" ")
    while True:
        match = _STRING.match(rest)
        if match is None:
            raise ValueError(f"expected a string item at {rest!r} in {value!r}")
        name, rest = match.group(1), rest[match.end() :]
        params: dict[str, SFValue] = {}
        while rest.startswith(";"):
            rest = rest[1:].lstrip(" ")
            key_match = _KEY.match(rest)
            if key_match is None:
                raise ValueError(f"expected a parameter key at {rest!r} in {value!r}")
            key, rest = key_match.group(), rest[key_match.end() :]
            params[key], rest = _bare_item(rest[1:]) if rest.startswith("=") else (True, rest)
        items.append((name, params))
        rest = rest.lstrip(" \t")
        if not rest:
            return items
        if not rest.startswith(","):
            raise ValueError(f"expected ',' at {rest!r} in {value!r}")
        rest = rest[1:].lstrip(" \t")
        if not rest:
            raise ValueError(f"trailing comma in {value!r}")


def rate_limit_headers(response: Response) -> dict[str, Any]:
    """The IETF and legacy headers, parsed; integers where the draft requires integers."""
    headers = response.headers
    policy = parse_sf_list(headers["ratelimit-policy"])
    state = parse_sf_list(headers["ratelimit"])
    for name, params in policy + state:
        assert re.fullmatch(r"[0-9a-z.\-]+", name), name
        assert all(type(v) is int and v >= 0 for v in params.values()), (name, params)
    assert [name for name, _ in state] == [name for name, _ in policy]
    return {
        "policy": [(name, params["q"], params["w"]) for name, params in policy],
        "state": [(name, params["r"], params["t"]) for name, params in state],
        "legacy": [int(headers[f"x-ratelimit-{part}"]) for part in ("limit", "remaining", "reset")],
    }


def test_the_structured_field_parser_is_strict() -> None:
    assert parse_sf_list('"a";q=1;w=60, "b-2";r=0;t=3') == [
        ("a", {"q": 1, "w": 60}),
        ("b-2", {"r": 0, "t": 3}),
    ]
    for bad in ['"a";w=2.592e+06', "a;q=1", '"a";q=1,', '"a" "b"', '"a";Q=1', '"a";q=']:
        with pytest.raises(ValueError):
            parse_sf_list(bad)


# --- headers, 429 bodies, Retry-After ------------------------------------------------------------


async def test_headers_on_every_response(backend: MemoryBackend) -> None:
    app = RateLimitMiddleware(ok_app, limit="3/minute;100/hour", backend=backend)
    responses = [await request(app) for _ in range(4)]
    assert [r.status for r in responses] == [200, 200, 200, 429]
    parsed = [rate_limit_headers(r) for r in responses]
    policy = [("3-per-60s", 3, 60), ("100-per-3600s", 100, 3600)]
    assert all(p["policy"] == policy for p in parsed)
    assert [p["state"] for p in parsed] == [
        [("3-per-60s", 2, 20), ("100-per-3600s", 99, 36)],
        [("3-per-60s", 1, 40), ("100-per-3600s", 98, 72)],
        [("3-per-60s", 0, 60), ("100-per-3600s", 97, 108)],
        [("3-per-60s", 0, 60), ("100-per-3600s", 97, 108)],  # the denial consumed nothing
    ]
    assert [p["legacy"] for p in parsed] == [[3, 2, 20], [3, 1, 40], [3, 0, 60], [3, 0, 60]]
    assert responses[0].body == b"ok"
    assert responses[0].headers["content-type"] == "text/plain"
    assert "retry-after" not in responses[2].headers
    assert responses[3].headers["retry-after"] == "20"


@pytest.mark.parametrize(
    ("limit", "quotas"),
    [
        ("1000/30 days", [(1000, 2_592_000)]),  # a monthly quota
        ("5/12 days;50/1000000 seconds", [(5, 1_036_800), (50, 1_000_000)]),
    ],
)
async def test_long_periods_are_announced_as_integers(
    backend: MemoryBackend, limit: str, quotas: list[tuple[int, int]]
) -> None:
    """The draft's ``w`` is an Integer of seconds: ``w=2.592e+06`` is no structured field."""
    response = await request(RateLimitMiddleware(ok_app, limit=limit, backend=backend))
    policy = rate_limit_headers(response)["policy"]
    assert [(q, w) for _, q, w in policy] == quotas


@pytest.mark.parametrize("limit", ["10/minute", "10/minute;1000/hour"])
async def test_a_lowered_limit_never_announces_fewer_than_none_remaining(
    backend: MemoryBackend, limit: str
) -> None:
    # 50 requests counted in this window under yesterday's 50/minute, then a deploy lowers
    # the limit: the fixed window holds more than the new amount. The headers say 0, the
    # draft's smallest integer, not -40 (nor a number read from the wrong end of a table).
    before = RateLimitMiddleware(
        ok_app, limit="50/minute;1000/hour", strategy="fixed-window", backend=backend
    )
    for _ in range(50):
        assert (await request(before)).status == 200
    after = RateLimitMiddleware(ok_app, limit=limit, strategy="fixed-window", backend=backend)
    response = await request(after)
    assert response.status == 429
    headers = rate_limit_headers(response)
    assert headers["state"][0][1] == 0
    assert headers["legacy"][1] == 0


async def test_429_is_a_problem_with_the_request_id(backend: MemoryBackend) -> None:
    app = resilient(ok_app, rate_limit="1/minute", rate_limit_backend=backend)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        assert (await client.get("/things")).status_code == 200
        limited = await client.get("/things", headers={"X-Request-ID": "req-429"})
    assert limited.status_code == 429
    assert limited.headers["content-type"] == "application/problem+json"
    assert limited.headers["x-request-id"] == "req-429"
    assert limited.headers["retry-after"] == "60"
    assert limited.headers["ratelimit"] == '"1-per-60s";r=0;t=60'
    body = limited.json()
    assert body["request_id"] == "req-429"
    assert (body["status"], body["title"], body["code"]) == (
        429,
        "Too Many Requests",
        "too_many_requests",
    )
    assert body["instance"] == "/things"
    assert "60" in body["detail"]


async def test_429_is_an_envelope_when_envelopes_are_on(backend: MemoryBackend) -> None:
    app = resilient(json_app, rate_limit="1/minute", rate_limit_backend=backend, envelope=True)
    ok = await request(app)
    limited = await request(app)
    assert ok.json()["data"] == {"ok": True}
    assert "ratelimit" in ok.headers
    assert limited.status == 429
    body = limited.json()
    assert body["success"] is False
    assert body["error"]["code"] == "too_many_requests"
    assert body["error"]["status"] == 429
    assert body["meta"]["request_id"] == limited.headers["x-request-id"]
    assert limited.headers["retry-after"] == "60"


# (strategy, limit, seconds after T0 of the first request, Retry-After on the denial)
RETRY_AFTER: list[tuple[StrategyName, str, float, int]] = [
    ("gcra", "3/second", 0, 1),  # real wait 1/3 s: at least 1
    ("gcra", "2/minute", 0, 30),
    ("fixed-window", "2/minute", 10.5, 50),  # real wait 49.5 s: rounded up
    ("sliding-window", "2/minute", 10, 80),
    ("sliding-window", "3/second", 0.25, 2),  # real wait 1.083 s
]


@pytest.mark.parametrize(("strategy", "limit", "start", "retry_after"), RETRY_AFTER)
async def test_a_retry_after_retry_after_is_admitted(
    clock: FakeClock,
    backend: MemoryBackend,
    strategy: StrategyName,
    limit: str,
    start: float,
    retry_after: int,
) -> None:
    app = RateLimitMiddleware(ok_app, limit=limit, strategy=strategy, backend=backend)
    clock.now = T0 + start
    statuses = []
    while (response := await request(app)).status == 200:
        statuses.append(response.status)
    denied_at = clock.now
    assert len(statuses) == int(limit.split("/")[0])
    assert response.headers["retry-after"] == str(retry_after)
    if retry_after > 1:  # rounded up to whole seconds: one second less is too early
        clock.now = denied_at + retry_after - 1
        assert (await request(app)).status == 429
    clock.now = denied_at + retry_after
    assert (await request(app)).status == 200


async def test_a_request_costing_more_than_the_limit_gets_no_retry_after(
    backend: MemoryBackend,
) -> None:
    app = RateLimitMiddleware(ok_app, limit="5/minute", backend=backend, cost=6)
    response = await request(app)
    assert response.status == 429
    assert "retry-after" not in response.headers
    assert "more than the rate limit allows" in response.json()["detail"]


# --- the path a request takes, chosen once -------------------------------------------------------


class AwaitedMemory:
    """A ``MemoryBackend`` behind nothing but the ``Backend`` protocol: the middleware awaits its
    ``Decision``s, as it does Redis' (the memory backend itself is decided in place)."""

    def __init__(self, clock: FakeClock) -> None:
        self.memory = MemoryBackend(clock=clock)

    async def decide(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        return self.memory.decide_now(strategy, key, rates, cost)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("strategy", ["gcra", "fixed-window", "sliding-window"])
@pytest.mark.parametrize("limit", ["3/second", "2/second;5/minute"])
@pytest.mark.parametrize("per_path", [False, True])
async def test_every_path_the_limiter_chooses_answers_alike(
    clock: FakeClock, strategy: StrategyName, limit: str, per_path: bool
) -> None:
    """In place (a MemoryBackend: a policy of one rate in plain numbers) or awaited (another
    backend: Decisions); the default configuration or per-path policies, exemptions and costs:
    the same responses, headers included, over a random run."""
    import random

    rnd = random.Random(f"{strategy}-{limit}-{per_path}")
    options: dict[str, Any] = {}
    paths = ["/"]
    if per_path:
        costs = {"/": 1, "/2": 2, "/3": 3}  # 3 exceeds 2/second: never admitted
        options = {
            "routes": {"/items/{item_id}": "1/second"},
            "exempt_paths": ["/health"],
            "cost": lambda scope: costs.get(scope["path"], 1),
        }
        paths = [*costs, "/health", "/items/7"]
    in_place, awaited = (
        RateLimitMiddleware(
            ok_app,
            limit=limit,
            strategy=strategy,
            backend=backend,
            registry=CollectorRegistry(),
            **options,
        )
        for backend in (MemoryBackend(clock=clock), AwaitedMemory(clock))
    )
    statuses = set()
    for _ in range(200):
        clock.advance(rnd.choice([0, 0, 0.125, 0.5, 1.5]))
        path = rnd.choice(paths)
        expected, actual = [await request(app, path) for app in (in_place, awaited)]
        assert (actual.status, actual.headers) == (expected.status, expected.headers), path
        statuses.add(expected.status)
    assert statuses == {200, 429}


# --- which limit applies -------------------------------------------------------------------------


def routed_app() -> Starlette:
    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.url.path)

    paths = ["/items/{item_id}", "/admin", "/admin/users", "/administrator", "/other"]
    return Starlette(routes=[Route(path, endpoint) for path in paths])


async def test_per_route_limits_by_template_and_prefix(backend: MemoryBackend) -> None:
    app = RateLimitMiddleware(
        routed_app(),
        limit="3/minute",
        backend=backend,
        routes={"/items/{item_id}": "2/minute", "/admin/": "1/minute"},
    )
    statuses = {path: (await request(app, path)).status for path in ["/items/1", "/items/2"]}
    items_3 = await request(app, "/items/3")
    assert statuses == {"/items/1": 200, "/items/2": 200}
    assert items_3.status == 429  # one budget for every item
    assert rate_limit_headers(items_3)["policy"] == [("2-per-60s", 2, 60)]
    assert (await request(app, "/admin")).status == 200
    assert (await request(app, "/admin/users")).status == 429  # the prefix shares one budget
    other = [(await request(app, path)).status for path in ["/administrator", "/other", "/x"]]
    assert other == [200, 200, 404]  # the default limit, its own budget: not a prefix match
    assert (await request(app, "/other")).status == 429
    assert (await request(app, "/items/1", peer="198.51.100.1")).status == 200  # per client


async def test_first_matching_route_wins(backend: MemoryBackend) -> None:
    app = RateLimitMiddleware(
        routed_app(),
        limit="1/minute",
        backend=backend,
        routes={"/admin/users": "3/minute", "/admin": "2/minute"},
    )
    users = [(await request(app, "/admin/users")).status for _ in range(4)]
    admin = [(await request(app, "/admin")).status for _ in range(3)]
    assert (users, admin) == ([200, 200, 200, 429], [200, 200, 429])


async def test_exempt_paths_get_no_headers_and_no_limit(backend: MemoryBackend) -> None:
    app = RateLimitMiddleware(
        ok_app, limit="1/minute", backend=backend, exempt_paths=["/static/", "/ping"]
    )
    assert (await request(app, "/limited")).status == 200
    assert (await request(app, "/limited")).status == 429
    for path in ["/static", "/static/", "/static/app.js", "/ping", "/ping/deep"] * 3:
        response = await request(app, path)
        assert response.status == 200, path
        assert not any(name.startswith(("ratelimit", "x-ratelimit")) for name in response.headers)
    assert (await request(app, "/staticky")).status == 429  # not under /static/
    assert len(backend) == 1


async def test_health_endpoints_are_never_limited(backend: MemoryBackend) -> None:
    app = resilient(ok_app, rate_limit="1/minute", rate_limit_backend=backend)
    assert (await request(app, "/work")).status == 200
    assert (await request(app, "/work")).status == 429
    for path in ["/health/live", "/health/ready", "/health", "/livez", "/readyz"] * 2:
        response = await request(app, path)
        assert response.status != 429, path
        assert "ratelimit" not in response.headers, path
    assert (await request(app, "/health/live")).status == 200


# --- who is limited ------------------------------------------------------------------------------


async def test_header_key(backend: MemoryBackend) -> None:
    app = RateLimitMiddleware(ok_app, limit="1/minute", backend=backend, key="header:X-API-Key")

    async def status(api_key: bytes | None, peer: str = PEER) -> int:
        headers = [(b"x-api-key", api_key)] if api_key is not None else []
        return (await request(app, headers=headers, peer=peer)).status

    assert [await status(b"key-a"), await status(b"key-b")] == [200, 200]
    assert await status(b"key-a", peer="198.51.100.9") == 429  # the key, wherever it comes from
    assert [await status(None), await status(b"")] == [200, 429]  # no key: the address
    assert await status(None, peer="198.51.100.9") == 200


def authenticate(app: ASGIApp) -> ASGIApp:
    """What an authentication middleware does: ``scope["user"]`` from an ``x-user`` header."""

    async def authenticated_app(scope: Scope, receive: Receive, send: Send) -> None:
        name = dict(scope["headers"]).get(b"x-user")
        user = SimpleUser(name.decode()) if name else UnauthenticatedUser()
        await app({**scope, "user": user}, receive, send)

    return authenticated_app


async def test_user_key(backend: MemoryBackend) -> None:
    app = authenticate(RateLimitMiddleware(ok_app, limit="1/minute", backend=backend, key="user"))

    async def status(user: bytes | None, peer: str = PEER) -> int:
        headers = [(b"x-user", user)] if user else []
        return (await request(app, headers=headers, peer=peer)).status

    assert [await status(b"alice"), await status(b"bob")] == [200, 200]  # same address
    assert await status(b"alice", peer="198.51.100.9") == 429
    assert [await status(None), await status(None)] == [200, 429]  # anonymous: the address
    assert await status(None, peer="198.51.100.9") == 200

    class Anything:
        def __str__(self) -> str:
            return "anything"

    bare = RateLimitMiddleware(ok_app, limit="1/minute", backend=MemoryBackend(), key="user")
    assert (await request(bare, user=Anything())).status == 200
    assert (await request(bare, user=Anything(), peer="198.51.100.9")).status == 429


async def test_callable_key_and_a_failing_one(
    backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    def tenant(scope: Scope) -> str | None:
        query = scope["query_string"].decode()
        if query == "tenant=broken":
            raise KeyError("tenant")
        return query.removeprefix("tenant=") or None

    app = RateLimitMiddleware(ok_app, limit="1/minute", backend=backend, key=tenant)

    async def status(query: bytes, peer: str = PEER) -> int:
        return (await request(app, query_string=query, peer=peer)).status

    assert [await status(b"tenant=a"), await status(b"tenant=b")] == [200, 200]
    assert await status(b"tenant=a", peer="198.51.100.9") == 429
    assert await status(b"") == 200  # None: the address
    assert await status(b"tenant=broken") == 429  # a failing key: the address too
    assert await status(b"tenant=broken", peer="198.51.100.9") == 200
    failures = [r for r in caplog.records if r.name == "asgi_resilience.ratelimit"]
    assert len(failures) == 2
    assert all(r.exc_info and r.exc_info[0] is KeyError for r in failures)
    assert "client address" in failures[0].getMessage()


async def test_cost(backend: MemoryBackend, caplog: pytest.LogCaptureFixture) -> None:
    def by_method(scope: Scope) -> int:
        costs = {"POST": 5, "GET": 1, "HEAD": 0}
        return costs[scope["method"]]  # KeyError for anything else

    app = RateLimitMiddleware(ok_app, limit="12/minute", backend=backend, cost=by_method)
    posts = [await request(app, method="POST") for _ in range(2)]
    assert [rate_limit_headers(r)["legacy"][1] for r in posts] == [7, 2]
    assert [(await request(app, method=m)).status for m in ["HEAD", "PUT"]] == [200, 200]
    assert (await request(app, method="POST")).status == 429
    assert (await request(app)).status == 429  # HEAD and PUT counted 1 each: nothing left
    assert len([r for r in caplog.records if r.exc_info]) == 1  # the failing cost, logged

    fixed = RateLimitMiddleware(ok_app, limit="10/minute", backend=MemoryBackend(), cost=3)
    assert [(await request(fixed)).status for _ in range(4)] == [200, 200, 200, 429]


# --- when the backend fails ----------------------------------------------------------------------


class HangingBackend:
    """A backend that never answers (a stuck network)."""

    def __init__(self) -> None:
        self.calls = 0

    async def decide(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        self.calls += 1
        await anyio.sleep(30)
        raise AssertionError("the middleware should have given up")

    async def aclose(self) -> None:
        pass


class FailingBackend:
    """A backend that fails at once (Redis refusing connections)."""

    async def decide(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        raise BackendError("connection refused")

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("broken", [HangingBackend, FailingBackend])
async def test_allow_on_backend_error_admits_within_the_timeout(
    broken: type[Backend], caplog: pytest.LogCaptureFixture
) -> None:
    timeout = 0.05
    app = RateLimitMiddleware(ok_app, backend=broken(), backend_timeout=timeout)
    assert app.backend_errors == 0
    for attempt in (1, 2, 3):
        started = time.perf_counter()
        response = await request(app)
        elapsed = time.perf_counter() - started
        assert response.status == 200
        assert response.body == b"ok"
        assert "ratelimit" not in response.headers
        assert elapsed < timeout + 0.03
        assert app.backend_errors == attempt
    warnings = [r for r in caplog.records if r.name == "asgi_resilience.ratelimit"]
    assert len(warnings) == 1  # logged once, then counted
    assert warnings[0].levelno == logging.WARNING
    assert "allowing" in warnings[0].getMessage()
    expected = "timed out" if broken is HangingBackend else "connection refused"
    assert expected in warnings[0].getMessage()


@pytest.mark.parametrize("broken", [HangingBackend, FailingBackend])
async def test_deny_on_backend_error_answers_503(broken: type[Backend]) -> None:
    timeout = 0.05
    app = resilient(
        RateLimitMiddleware(
            ok_app, backend=broken(), on_backend_error="deny", backend_timeout=timeout
        )
    )
    started = time.perf_counter()
    response = await request(app)
    assert time.perf_counter() - started < timeout + 0.03
    assert response.status == 503
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["code"]) == (503, "service_unavailable")
    assert body["request_id"] == response.headers["x-request-id"]
    assert "rate limit" in body["detail"].lower()


# --- what passes through -------------------------------------------------------------------------


async def test_streaming_responses_pass_through_unchanged(backend: MemoryBackend) -> None:
    chunks = [b"first ", b"second ", b"", b"third"]

    async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/plain"), (b"x-custom", b"1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await anyio.lowlevel.checkpoint()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    app = RateLimitMiddleware(streaming_app, limit="5/minute", backend=backend)
    response = await request(app)
    assert [m["type"] for m in response.messages] == ["http.response.start"] + [
        "http.response.body"
    ] * 5
    assert [m["body"] for m in response.body_messages] == [*chunks, b""]
    assert [m["more_body"] for m in response.body_messages] == [True] * 4 + [False]
    names = [name for name, _ in response.start["headers"]]
    assert names[:2] == [b"content-type", b"x-custom"]  # the app's own headers first, intact
    assert rate_limit_headers(response)["legacy"] == [5, 4, 12]


async def test_pathsend_passes_through(backend: MemoryBackend) -> None:
    async def file_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})

    response = await request(RateLimitMiddleware(file_app, backend=backend))
    assert [m["type"] for m in response.messages] == [
        "http.response.start",
        "http.response.pathsend",
    ]
    assert response.messages[1]["path"] == "/etc/hostname"
    assert "ratelimit" in response.headers


def test_websockets_pass_through_a_limited_app() -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            if text == "bye":
                break
            await websocket.send_text(f"echo {text}")
        await websocket.close()

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("home")

    inner = Starlette(routes=[Route("/", home), WebSocketRoute("/ws", echo)])
    app = RateLimitMiddleware(inner, limit="1/minute")
    with TestClient(app) as client:
        assert client.get("/").status_code == 200
        assert client.get("/").status_code == 429
        for connection in range(3):
            with client.websocket_connect("/ws") as websocket:
                for n in range(3):
                    websocket.send_text(f"{connection}.{n}")
                    assert websocket.receive_text() == f"echo {connection}.{n}"
                websocket.send_text("bye")


async def test_lifespan_passes_through(backend: MemoryBackend) -> None:
    seen: list[Message] = []

    async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await receive())
        await send({"type": "lifespan.startup.complete"})

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    app = RateLimitMiddleware(lifespan_app, backend=backend)
    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert (seen, sent) == ([{"type": "lifespan.startup"}], [{"type": "lifespan.startup.complete"}])


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit": "lots"}, "invalid rate 'lots'"),
        ({"limit": "0/minute"}, "at least 1 request"),
        ({"strategy": "leaky-bucket"}, "unknown strategy 'leaky-bucket'"),
        ({"backend": "memcached://localhost"}, "unknown rate limit backend"),
        ({"key": "cookie:session"}, "key must be 'ip', 'user', 'header:<name>' or a callable"),
        ({"key": "header: "}, "key must be"),
        ({"trusted_proxies": ["10.0.0.0/8", "proxy.internal"]}, "trusted_proxies entries"),
        ({"routes": {"items/{id}": "1/second"}}, "routes keys must start with '/'"),
        ({"routes": {"/items": "1/fortnight"}}, "invalid rate '1/fortnight'"),
        ({"cost": 0}, "cost must be an integer >= 1"),
        ({"cost": 1.5}, "cost must be an integer >= 1"),
        ({"on_backend_error": "ignore"}, "on_backend_error must be 'allow' or 'deny'"),
        ({"backend_timeout": 0}, "backend_timeout must be a number of seconds > 0"),
        ({"backend_timeout": -1.0}, "backend_timeout must be a number of seconds > 0"),
    ],
)
def test_invalid_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RateLimitMiddleware(ok_app, **options)


def test_resilient_rejects_invalid_rate_limit_options() -> None:
    with pytest.raises(ValueError, match="invalid rate 'often'"):
        resilient(ok_app, rate_limit="often")
    with pytest.raises(ValueError, match=r"^rate_limit_strategy must be one of 'gcra'"):
        resilient(ok_app, rate_limit="1/second", rate_limit_strategy="token")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^trusted_proxies entries"):
        resilient(ok_app, rate_limit="1/second", trusted_proxies=["everyone"])


# --- client addresses behind proxies -------------------------------------------------------------

TRUSTED = ["10.0.0.0/8", "::1", "2001:db8:ffff::/48", "192.0.2.1"]
XFF = b"x-forwarded-for"
FWD = b"forwarded"
LONG_CHAIN = ", ".join(["198.51.100.1"] * 700 + ["203.0.113.7"]).encode()

# (peer, forwarding headers, the client address resolved)
RESOLVED: list[tuple[str, list[tuple[bytes, bytes]], str]] = [
    ("10.0.0.1", [(XFF, b"203.0.113.7")], "203.0.113.7"),
    ("10.0.0.1", [(XFF, b"203.0.113.7:51234")], "203.0.113.7"),
    ("10.0.0.1", [(XFF, b"2001:db8::7")], "2001:db8::7"),
    ("10.0.0.1", [(XFF, b"[2001:db8::7]")], "2001:db8::7"),
    ("10.0.0.1", [(XFF, b"[2001:db8::7]:4711")], "2001:db8::7"),
    ("10.0.0.1", [(XFF, b"198.51.100.1, 203.0.113.7, 10.0.0.9")], "203.0.113.7"),
    ("10.0.0.1", [(XFF, b"198.51.100.1,203.0.113.7 ,  192.0.2.1")], "203.0.113.7"),
    ("10.0.0.1", [(XFF, b"198.51.100.1"), (XFF, b"203.0.113.7, 10.0.0.9")], "203.0.113.7"),
    ("10.0.0.1", [(XFF, b"10.0.0.7, 10.0.0.9")], "10.0.0.7"),  # every hop ours: the leftmost
    ("10.0.0.1", [(XFF, LONG_CHAIN)], "203.0.113.7"),  # 10 kB: only the right end matters
    ("10.0.0.1", [(FWD, b"for=203.0.113.7")], "203.0.113.7"),
    ("10.0.0.1", [(FWD, b'for="203.0.113.7:80";proto=https')], "203.0.113.7"),
    ("10.0.0.1", [(FWD, b'for="[2001:db8::7]:4711";proto=https')], "2001:db8::7"),
    ("10.0.0.1", [(FWD, b"proto=https;For=203.0.113.7;by=10.0.0.1")], "203.0.113.7"),
    ("10.0.0.1", [(FWD, b"for=198.51.100.1, for=203.0.113.7, for=10.0.0.9")], "203.0.113.7"),
    # Both present: only the configured header counts (X-Forwarded-For unless told otherwise).
    ("10.0.0.1", [(XFF, b"198.51.100.1"), (FWD, b"for=203.0.113.7")], "198.51.100.1"),
    ("::1", [(XFF, b"203.0.113.7")], "203.0.113.7"),
    ("2001:db8:ffff::5", [(XFF, b"2001:db8::7, 2001:db8:ffff::9")], "2001:db8::7"),
    ("192.0.2.1", [(XFF, b"203.0.113.7")], "203.0.113.7"),
    # Untrusted peers: their headers change nothing.
    (PEER, [(XFF, b"198.51.100.1")], PEER),
    (PEER, [(FWD, b"for=198.51.100.1")], PEER),
    ("192.0.2.2", [(XFF, b"198.51.100.1")], "192.0.2.2"),
    ("10.0.0.1", [], "10.0.0.1"),  # a trusted peer without headers is the client
]

# Forwarding headers from a trusted peer (10.0.0.1) that name no usable client: the peer it is.
MALFORMED: list[list[tuple[bytes, bytes]]] = [
    [(XFF, b"garbage")],
    [(XFF, b"unknown")],
    [(XFF, b"_hidden")],
    [(XFF, b"")],
    [(XFF, b" , ,")],
    [(XFF, b"203.0.113.7, ")],  # an empty element nearest to us
    [(XFF, b"203.0.113.7 198.51.100.1")],
    [(XFF, b"1.2.3")],
    [(XFF, b"999.0.113.7")],
    [(XFF, b"203.0.113.0/24")],
    [(XFF, b"2001:db8::7::1")],
    [(XFF, b"[2001:db8::zz]:80")],
    [(XFF, b"[]:80")],
    [(XFF, b"\xff\xfe\x00\x01")],
    [(XFF, b"x" * 10_240)],
    [(XFF, b"," * 10_240)],
    [(XFF, b"203.0.113.7, " + b"a" * 10_240)],
    [(FWD, b"for=unknown")],
    [(FWD, b"for=_hidden")],
    [(FWD, b'for="_gazonk"')],
    [(FWD, b"for=")],
    [(FWD, b'for="')],
    [(FWD, b"by=10.0.0.1;proto=https")],
    [(FWD, b"garbage")],
    [(FWD, b'for="[2001:db8::7"x')],
]


def proxies_for(headers: Sequence[tuple[bytes, bytes]]) -> TrustedProxies:
    """Trusted proxies that read ``Forwarded`` when a case only has that header."""
    names = {name for name, _ in headers}
    forwarded_only = FWD in names and XFF not in names
    return TrustedProxies(TRUSTED, header="forwarded" if forwarded_only else "x-forwarded-for")


def scope_from(peer: str | None, headers: Sequence[tuple[bytes, bytes]]) -> Scope:
    scope = http_scope(headers=headers)
    scope["client"] = (peer, 4711) if peer is not None else None
    return scope


@pytest.mark.parametrize(("peer", "headers", "client"), RESOLVED)
def test_trusted_proxies_resolve_the_client(
    peer: str, headers: list[tuple[bytes, bytes]], client: str
) -> None:
    assert proxies_for(headers).client(scope_from(peer, headers)) == client


@pytest.mark.parametrize("headers", MALFORMED)
def test_malformed_forwarding_headers_name_the_peer(headers: list[tuple[bytes, bytes]]) -> None:
    assert proxies_for(headers).client(scope_from("10.0.0.1", headers)) == "10.0.0.1"


def test_a_client_sent_forwarded_header_cannot_choose_the_address() -> None:
    """The proxy appends the real client to X-Forwarded-For and passes the client's own
    Forwarded header through: reading Forwarded there would let clients pick any address."""
    headers = [(XFF, b"203.0.113.7"), (FWD, b"for=198.51.100.99")]
    assert TrustedProxies(TRUSTED).client(scope_from("10.0.0.1", headers)) == "203.0.113.7"
    forwarded = TrustedProxies(TRUSTED, header="forwarded")
    assert forwarded.client(scope_from("10.0.0.1", headers)) == "198.51.100.99"
    with pytest.raises(ValueError, match="header must be"):
        TrustedProxies(TRUSTED, header="x-real-ip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a list"):
        TrustedProxies("10.0.0.1")


@pytest.mark.parametrize(
    ("headers", "acceptable"),
    [
        # More hops than the walk looks at: an untrusted hop lies in between, unexamined.
        ([(XFF, ", ".join(["7.7.7.7", "6.6.6.6"] + ["10.0.0.1"] * 40).encode())], {"6.6.6.6"}),
        # A 10 kB chain of proxies cut at 8 kB: its first element is a fragment, "10.0.0.1".
        ([(XFF, ", ".join(["110.0.0.1"] * 1000).encode())], {"110.0.0.1"}),
    ],
    ids=["beyond-32-hops", "cut-in-the-middle-of-an-address"],
)
def test_the_walk_never_returns_a_hop_it_did_not_examine(
    headers: list[tuple[bytes, bytes]], acceptable: set[str]
) -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "110.0.0.0/8"])
    peer = "10.0.0.2"
    assert proxies.client(scope_from(peer, headers)) in acceptable | {peer}


def test_trusted_proxies_basics() -> None:
    none = TrustedProxies()
    assert not none
    assert none.client(scope_from("10.0.0.1", [(XFF, b"203.0.113.7")])) == "10.0.0.1"
    assert none.client(scope_from(None, [])) is None
    proxies = TrustedProxies([" 10.0.0.1/8 ", "::1"])  # host bits are forgiven
    assert proxies
    assert proxies.networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))
    assert proxies.is_trusted(ipaddress.ip_address("10.255.0.1"))
    assert not proxies.is_trusted(ipaddress.ip_address("::ffff:10.0.0.1"))
    assert proxies.client(scope_from(None, [(XFF, b"203.0.113.7")])) is None
    assert proxies.client(scope_from("not-an-address", [(XFF, b"203.0.113.7")])) == (
        "not-an-address"
    )
    for bad in ["10.0.0.0/33", "proxy.internal", "", "10.0.0.1-10.0.0.9"]:
        with pytest.raises(ValueError, match="trusted_proxies entries must be IP addresses"):
            TrustedProxies([bad])


async def test_forwarded_clients_share_a_budget_and_spoofs_change_nothing(
    backend: MemoryBackend,
) -> None:
    app = RateLimitMiddleware(
        ok_app, limit="1/minute", backend=backend, trusted_proxies=["10.0.0.0/8"]
    )

    async def status(peer: str, forwarded_for: bytes | None = None) -> int:
        headers = [(XFF, forwarded_for)] if forwarded_for is not None else []
        return (await request(app, peer=peer, headers=headers)).status

    assert await status("10.0.0.1", b"198.51.100.7") == 200
    assert await status("10.0.0.2", b"198.51.100.7") == 429  # another proxy, same client
    assert await status("10.0.0.1", b"198.51.100.8") == 200
    assert await status(PEER, b"198.51.100.99") == 200  # untrusted: the peer is the client
    assert await status(PEER, b"198.51.100.100") == 429  # a new spoof: the same bucket
    assert await status(PEER) == 429
    assert await status("10.0.0.3", b"garbage") == 200
    assert await status("10.0.0.3") == 429  # garbage fell back to the peer's bucket
    assert await status("10.0.0.3", b"[2001:db8::7]:443") == 200
    assert await status("10.0.0.4", b"2001:db8::7") == 429


@pytest.mark.parametrize("headers", MALFORMED)
async def test_malformed_headers_fall_back_to_the_peer_bucket(
    backend: MemoryBackend, headers: list[tuple[bytes, bytes]]
) -> None:
    app = RateLimitMiddleware(
        ok_app, limit="1/minute", backend=backend, trusted_proxies=["10.0.0.0/8"]
    )
    assert (await request(app, peer="10.0.0.1")).status == 200
    assert (await request(app, peer="10.0.0.1", headers=headers)).status == 429


async def test_no_client_address_at_all(backend: MemoryBackend) -> None:
    app = RateLimitMiddleware(
        ok_app, limit="1/minute", backend=backend, trusted_proxies=["10.0.0.0/8"]
    )
    assert (await request(app, peer=None, headers=[(XFF, b"203.0.113.7")])).status == 200
    assert (await request(app, peer=None)).status == 429


async def test_access_log_shows_the_address_the_limiter_used(
    backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "asgi_resilience.access")
    app = resilient(
        ok_app,
        rate_limit="1/minute",
        rate_limit_backend=backend,
        trusted_proxies=["10.0.0.0/8", "2001:db8:ffff::/48"],
    )
    calls = [
        ("10.0.0.1", [(XFF, b"198.51.100.7")]),
        ("10.0.0.2", [(XFF, b"198.51.100.7:1234")]),
        ("2001:db8:ffff::1", [(XFF, b"[2001:db8::7]:80")]),
        (PEER, [(XFF, b"198.51.100.8")]),
        ("10.0.0.3", [(XFF, b"_hidden")]),
    ]
    statuses = [(await request(app, peer=peer, headers=headers)).status for peer, headers in calls]
    assert statuses == [200, 429, 200, 200, 200]
    records = [r for r in caplog.records if r.name == "asgi_resilience.access"]
    clients = [getattr(r, "client", None) for r in records]
    assert clients == ["198.51.100.7", "198.51.100.7", "2001:db8::7", PEER, "10.0.0.3"]
    assert [getattr(r, "rate_limited", None) for r in records] == [
        False,
        True,
        False,
        False,
        False,
    ]


async def test_ipv6_clients_share_a_budget_per_64_network() -> None:
    app = RateLimitMiddleware(ok_app, limit="2/minute", registry=CollectorRegistry())
    statuses = [
        (await request(app, peer=f"2001:db8:1:2::{n}")).status for n in range(4)
    ]  # one host rotating through its /64
    assert statuses == [200, 200, 429, 429]
    other_network = await request(app, peer="2001:db8:1:3::1")
    assert other_network.status == 200
    mapped = [(await request(app, peer=peer)).status for peer in ("::ffff:192.0.2.9", "192.0.2.9")]
    assert mapped == [200, 200]  # an IPv4-mapped address is that IPv4 address: 2 of 2
    assert (await request(app, peer="192.0.2.9")).status == 429
    narrow = RateLimitMiddleware(
        ok_app, limit="1/minute", ipv6_prefix=128, registry=CollectorRegistry()
    )
    assert [(await request(narrow, peer=f"2001:db8::{n}")).status for n in range(2)] == [200, 200]
    for bad in (0, 129, 64.5, True, "64"):
        with pytest.raises(ValueError, match="ipv6_prefix"):
            RateLimitMiddleware(ok_app, ipv6_prefix=bad)  # type: ignore[arg-type]


def test_a_string_where_a_list_is_expected_is_refused() -> None:
    with pytest.raises(ValueError, match=r"must be a list of paths, e.g. \['/internal'\]"):
        RateLimitMiddleware(ok_app, exempt_paths="/internal")


def test_unix_socket_peers_are_trusted_proxies_only_when_listed() -> None:
    forwarded = [(XFF, b"203.0.113.7, 10.0.0.1")]
    unix = TrustedProxies(["unix", "10.0.0.0/8"])
    assert unix.client(scope_from(None, forwarded)) == "203.0.113.7"
    assert TrustedProxies(["unix"]).client(scope_from(None, forwarded)) == "10.0.0.1"
    assert TrustedProxies(["10.0.0.0/8"]).client(scope_from(None, forwarded)) is None
    assert TrustedProxies(["unix"]).client(scope_from("198.51.100.9", forwarded)) == "198.51.100.9"
    assert TrustedProxies(["UNIX"]) and not TrustedProxies([])
    with pytest.raises(ValueError, match="IP addresses, CIDR networks or 'unix'"):
        TrustedProxies(["unix:/run/nginx.sock"])


async def test_clients_behind_a_unix_socket_proxy_get_buckets_of_their_own() -> None:
    app = RateLimitMiddleware(ok_app, limit="2/minute", trusted_proxies=["unix"])

    async def from_client(address: str) -> int:
        scope = scope_from(None, [(XFF, address.encode())])
        return (await call(app, scope)).status

    assert [await from_client("203.0.113.1") for _ in range(3)] == [200, 200, 429]
    assert await from_client("203.0.113.2") == 200  # not the first client's bucket


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_a_refused_request_is_recorded_under_its_route_template(
    framework: str, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi import FastAPI
    from starlette.routing import Mount

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse("item")

    if framework == "starlette":
        inner: ASGIApp = Starlette(routes=[Mount("/api", routes=[Route("/items/{item_id}", item)])])
        template = "/api/items/{item_id}"
    else:
        api = FastAPI()
        api.get("/items/{item_id}")(lambda item_id: {"item": item_id})
        inner, template = api, "/items/{item_id}"
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    app = resilient(inner, rate_limit="1/minute", registry=registry, tracer_provider=provider)
    caplog.set_level(logging.INFO, "asgi_resilience.access")
    path = template.replace("{item_id}", "7")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        assert [(await client.get(path)).status_code for _ in range(2)] == [200, 429]
    routes = [
        getattr(r, "route", None) for r in caplog.records if r.name == "asgi_resilience.access"
    ]
    assert routes == [template, template]
    limited = registry.get_sample_value(
        "http_server_request_duration_seconds_count",
        {"method": "GET", "route": template, "status_code": "429"},
    )
    assert limited == 1
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == [f"GET {template}"] * 2
    assert [span.attributes and span.attributes["http.route"] for span in spans] == [template] * 2


class FlakyBackend:
    """Fails while ``failing`` is set, else decides in memory."""

    def __init__(self) -> None:
        self.failing = True
        self.memory = MemoryBackend()

    async def decide(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        if self.failing:
            raise BackendError("connection refused")
        return self.memory.decide_now(strategy, key, rates, cost)

    async def aclose(self) -> None:
        pass


async def test_the_throttled_warning_counts_every_failure_since_the_last_one(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgi_resilience.ratelimit import middleware

    clock = FakeClock(1000.0)
    monkeypatch.setattr(middleware, "monotonic", clock)
    backend = FlakyBackend()
    app = RateLimitMiddleware(ok_app, backend=backend)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "asgi_resilience.ratelimit"]

    for _ in range(7):
        assert (await request(app)).status == 200
    assert warnings() == [
        "Rate limit backend failed 1 time, allowing; last error: connection refused"
    ]
    clock.now += 4
    for _ in range(5):
        await request(app)
    assert len(warnings()) == 1  # within 10 s of the last warning: counted, held back
    clock.now += 6
    backend.failing = False  # Redis is back: the next decision reports what was held back
    assert "ratelimit" in (await request(app)).headers
    assert warnings()[1:] == [
        "Rate limit backend failed 11 times in 10 s, allowing; last error: connection refused"
    ]
    clock.now += 60
    await request(app)
    assert len(warnings()) == 2  # nothing new to report
    assert app.backend_errors == 12


async def test_a_request_decided_without_the_backend_is_marked_in_the_access_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "asgi_resilience.access")
    app = resilient(RateLimitMiddleware(ok_app, backend=FailingBackend()))
    ok = resilient(RateLimitMiddleware(ok_app, limit="1/minute"))
    assert (await request(app)).status == 200
    assert [(await request(ok)).status for _ in range(2)] == [200, 429]
    marks = [getattr(r, "rate_limited", None) for r in caplog.records if r.name.endswith("access")]
    assert marks == ["error", False, True]
