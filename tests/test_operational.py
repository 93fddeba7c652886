"""``operational_allow``: only the networks given read ``/metrics`` and ``/health/status``,
judged on the client address after trusted proxies; the probes stay open."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from asgi_resilience import ConfigurationError, resilient
from asgi_resilience.types import ASGIApp
from tests.asgi import Response, call, http_scope

pytestmark = pytest.mark.anyio

INSIDE, OUTSIDE = "10.1.2.3", "203.0.113.9"


def service(**options: Any) -> ASGIApp:
    return resilient(
        Starlette(),
        environ={},
        registry=CollectorRegistry(),
        health_status_details=True,
        operational_allow=["10.0.0.0/8"],
        **options,
    )


async def get(
    app: ASGIApp, path: str, peer: str | None, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    scope = http_scope(path, headers=headers or [])
    scope["client"] = (peer, 50000) if peer is not None else None
    return await call(app, scope)


@pytest.mark.parametrize("path", ["/metrics", "/health/status"])
async def test_only_the_allowed_networks_read_the_operational_endpoints(path: str) -> None:
    app = service()
    assert (await get(app, path, INSIDE)).status == 200
    refused = await get(app, path, OUTSIDE)
    assert refused.status == 404  # as if nothing were there
    assert refused.headers["content-type"] == "application/problem+json"
    assert b"asgi_resilience" not in refused.body and b"http_server" not in refused.body


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/livez", "/readyz"])
async def test_the_probes_stay_open_to_everyone(path: str) -> None:
    app = service()
    async with LifespanManager(app):
        assert (await get(app, path, OUTSIDE)).status == 200


async def test_behind_trusted_proxies_the_forwarded_client_decides() -> None:
    app = service(trusted_proxies=["192.0.2.1"])
    forwarded_inside = [(b"x-forwarded-for", INSIDE.encode())]
    forwarded_outside = [(b"x-forwarded-for", OUTSIDE.encode())]
    assert (await get(app, "/metrics", "192.0.2.1", forwarded_inside)).status == 200
    assert (await get(app, "/metrics", "192.0.2.1", forwarded_outside)).status == 404


async def test_a_spoofed_forwarded_header_from_an_untrusted_peer_does_not_get_in() -> None:
    app = service(trusted_proxies=["192.0.2.1"])
    spoofed = [(b"x-forwarded-for", INSIDE.encode())]
    assert (await get(app, "/metrics", OUTSIDE, spoofed)).status == 404
    # without trusted proxies no forwarding header is read at all
    assert (await get(service(), "/metrics", OUTSIDE, spoofed)).status == 404


async def test_unix_socket_peers_only_with_unix_in_the_list() -> None:
    assert (await get(service(), "/metrics", None)).status == 404
    unix = resilient(Starlette(), environ={}, operational_allow=["unix"])
    assert (await get(unix, "/metrics", None)).status == 200
    assert (await get(unix, "/metrics", INSIDE)).status == 404


async def test_an_ipv4_mapped_peer_counts_as_its_ipv4_address() -> None:
    assert (await get(service(), "/metrics", f"::ffff:{INSIDE}")).status == 200
    assert (await get(service(), "/metrics", f"::ffff:{OUTSIDE}")).status == 404


async def test_without_an_allow_list_everyone_reads_them() -> None:
    app = resilient(Starlette(), environ={}, registry=CollectorRegistry())
    assert (await get(app, "/metrics", OUTSIDE)).status == 200


async def test_a_thousand_concurrent_requests_from_both_sides_each_get_their_answer() -> None:
    app = service(trusted_proxies=["192.0.2.1"], access_log=False)
    answers: list[tuple[bool, int]] = []

    async def one(n: int) -> None:
        inside = n % 2 == 0
        forwarded = [(b"x-forwarded-for", (INSIDE if inside else OUTSIDE).encode())]
        response = await get(app, "/metrics", "192.0.2.1", forwarded)
        answers.append((inside, response.status))

    async with anyio.create_task_group() as group:
        for n in range(1000):
            group.start_soon(one, n)
    assert sorted(set(answers)) == [(False, 404), (True, 200)]
    assert len(answers) == 1000


def test_from_the_environment() -> None:
    app = resilient(Starlette(), environ={"ASGI_RESILIENCE_OPERATIONAL_ALLOW": "10.0.0.0/8, unix"})
    assert app.options.operational_allow == ("10.0.0.0/8", "unix")
    with pytest.raises(ConfigurationError, match=r"ASGI_RESILIENCE_OPERATIONAL_ALLOW='10\.0\.0'"):
        resilient(Starlette(), environ={"ASGI_RESILIENCE_OPERATIONAL_ALLOW": "10.0.0"})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.0/8", "operational_allow must be a list of networks"),
        (["10.0.0.0/33"], "operational_allow entries must be IP addresses, CIDR networks"),
        ([10], "operational_allow entries must be strings"),
    ],
)
def test_a_wrong_value_is_refused_naming_the_option(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resilient(Starlette(), environ={}, operational_allow=value)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/metrics"), ("DELETE", "/metrics"), ("DELETE", "/health"), ("PUT", "/health/ready")],
)
async def test_built_in_endpoints_answer_get_and_head_only(method: str, path: str) -> None:
    app = resilient(Starlette(), environ={}, registry=CollectorRegistry())
    scope = http_scope(path, method=method)
    response = await call(app, scope)
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert response.headers["content-type"] == "application/problem+json"
    head = await call(app, http_scope("/metrics", method="HEAD"))
    assert head.status == 200 and head.body == b""


@pytest.mark.parametrize("peer", ["10.0.0.1", "::ffff:10.0.0.1"])
async def test_a_trusted_balancer_on_a_dual_stack_listener_lets_no_one_through(peer: str) -> None:
    # Hypercorn on [::] reports an IPv4 peer as ::ffff:a.b.c.d: still the trusted balancer,
    # so the forwarded client decides, not the balancer's own (allowed) address.
    app = resilient(
        Starlette(),
        environ={},
        registry=CollectorRegistry(),
        trusted_proxies=["10.0.0.0/8"],
        operational_allow=["10.0.0.0/8"],
    )
    outside = [(b"x-forwarded-for", OUTSIDE.encode())]
    assert (await get(app, "/metrics", peer, outside)).status == 404
    inside = [(b"x-forwarded-for", INSIDE.encode())]
    assert (await get(app, "/metrics", peer, inside)).status == 200
