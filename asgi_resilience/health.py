"""Health endpoints for probes: liveness, readiness (with cached dependency checks), status."""

from __future__ import annotations

import json
from collections.abc import Callable
from time import monotonic
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Gauge

from .context import RequestContext, route_path
from .lifespan import CheckResult, Lifespan
from .metrics import collectors
from .problems import send_error
from .proxies import parse_address
from .types import Receive, Scope, Send

__all__ = ["HealthApp"]


@collectors
class HealthCollectors:
    """What readiness probes found."""

    def __init__(self, registry: CollectorRegistry, request_path: Any) -> None:
        self.health_check_up = Gauge(
            "asgi_resilience_health_check_up",
            "1 when the readiness check passed at its last run, else 0.",
            ["check"],
            multiprocess_mode="livemin",
            registry=registry,
        )


_ALLOW = [(b"allow", b"GET, HEAD")]
_ALLOW_POST = [(b"allow", b"POST")]


# Headers a proxy adds to what it forwards: a request carrying one came from somewhere else,
# through a proxy on this machine (a sidecar, nginx on the host), whatever its peer address.
_FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-", b"x-real-ip", b"x-envoy-", b"via")


def _from_loopback(scope: Scope) -> bool:
    """The connection's own peer is this machine and nothing forwarded the request."""
    client = scope.get("client")
    if not client:
        return False  # a unix socket: its peer is the proxy in front, serving anyone
    address = parse_address(str(client[0]))  # ::ffff:127.0.0.1 on a dual-stack listener too
    if address is None or not address.is_loopback:
        return False
    return not any(name.lower().startswith(_FORWARDING_HEADERS) for name, _ in scope["headers"])


class HealthApp:
    """A plain ASGI app answering health probes; ``resilient()`` mounts it.

    Paths (``path`` defaults to ``/health``):

    - ``/health/live`` and ``/livez``: 200 while the process can answer; touches no dependency.
    - ``/health/ready`` and ``/readyz``: 200 only when the lifespan has started, is not
      draining, every critical readiness check passes and every critical background task is
      running; else 503 (the body names the tasks down in ``tasks_down``). Checks run concurrently,
      each under its own timeout; results are cached for ``cache_ttl`` seconds and concurrent
      probes share one run, so a probe storm runs each check at most once per ``cache_ttl``.
      The body lists each check with ``status`` (up/down), ``duration_ms`` and ``error``.
    - ``/health``: a summary: ``ok``, ``degraded`` (a non-critical check is down) or
      ``unavailable``; 200 or 503 as readiness.
    - ``/health/status``: state, uptime, version, check results and the lifespan's status
      sections (pools, breakers); only with ``status_details=True`` (it describes internals),
      404 otherwise.
    - ``POST /health/drain``: begin draining now (readiness 503), answer once ``drain_delay``
      has passed and long-lived connections were told to close: what a Kubernetes ``preStop``
      hook calls (``asgi-resilience drain``) for a server whose own SIGTERM handling cannot
      wait. Only a loopback peer may call it, and only with no forwarding header (a sidecar or
      a proxy on the host connects from loopback for the whole internet; a unix socket's peer
      is such a proxy too); anyone else gets 404, as if it did not exist.

    Only GET and HEAD (405 otherwise; ``/drain``: only POST). Responses are JSON with
    ``Cache-Control: no-store``; errors use the stack's error shape. Other paths answer 404.

    Args:
        lifespan: whose state and checks decide readiness; ``None``: always ready, no checks.
        path: prefix of the health paths.
        probe_aliases: also answer ``/livez`` and ``/readyz``.
        cache_ttl: seconds readiness results are reused.
        clock: where those seconds are read (``time.monotonic``; tests give a fake one).
        status_details: serve ``/health/status``.
        version: shown in ``/health/status``.
    """

    def __init__(
        self,
        lifespan: Lifespan | None = None,
        *,
        path: str = "/health",
        probe_aliases: bool = True,
        cache_ttl: float = 1.0,
        status_details: bool = False,
        version: str | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if not path.startswith("/") or path != path.rstrip("/") or len(path) < 2:
            raise ValueError(f"path must start with '/' and not end with it, got {path!r}")
        if not cache_ttl >= 0:
            raise ValueError(f"cache_ttl must be >= 0 seconds, got {cache_ttl!r}")
        self.lifespan = lifespan
        if not callable(clock):
            raise ValueError(f"clock must be a callable returning seconds, got {clock!r}")
        self.cache_ttl = cache_ttl
        self.clock = clock
        self.status_details = status_details
        self.version = version
        self.routes: dict[str, Callable[[], Any]] = {
            f"{path}/live": self._live,
            f"{path}/ready": self._ready,
            path: self._summary,
            f"{path}/status": self._status,
            f"{path}/drain": self._drain,
        }
        self.drain_path = f"{path}/drain"
        self._drain_ends: float | None = None
        if probe_aliases:
            self.routes["/livez"] = self._live
            self.routes["/readyz"] = self._ready
        self._cached: tuple[float, dict[str, CheckResult]] | None = None
        self._running: anyio.Event | None = None

    @property
    def paths(self) -> frozenset[str]:
        """Every path this app answers."""
        return frozenset(self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # nothing to serve on WebSocket or lifespan scopes
        path = route_path(scope)
        handler = self.routes.get(path)
        if path == self.drain_path:
            if self.lifespan is None or not _from_loopback(scope):
                await send_error(RequestContext.current(), scope, send, 404)
            elif scope["method"] != "POST":
                await send_error(RequestContext.current(), scope, send, 405, headers=_ALLOW_POST)
            else:
                status, body = await self._drain()
                await _send_json(scope, send, status, body)
        elif handler is None or (handler == self._status and not self.status_details):
            await send_error(RequestContext.current(), scope, send, 404)
        elif scope["method"] not in ("GET", "HEAD"):
            await send_error(RequestContext.current(), scope, send, 405, headers=_ALLOW)
        else:
            status, body = await handler()
            await _send_json(scope, send, status, body)

    async def _drain(self) -> tuple[int, dict[str, Any]]:
        lifespan = self.lifespan
        assert lifespan is not None
        if self._drain_ends is None or lifespan.state == "ready":
            self._drain_ends = anyio.current_time() + lifespan.drain_delay
        lifespan.begin_drain()
        # Every caller returns when the one drain delay ends (a retried hook waits no longer).
        await anyio.sleep(max(0.0, self._drain_ends - anyio.current_time()))
        lifespan.go_away()
        return 200, {"status": lifespan.state, "drain_delay": lifespan.drain_delay}

    async def _live(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "alive"}

    async def _ready(self) -> tuple[int, dict[str, Any]]:
        ready, body = await self.readiness()
        return (200 if ready else 503), body

    async def _summary(self) -> tuple[int, dict[str, Any]]:
        ready, body = await self.readiness()
        degraded = any(c["status"] == "down" for c in body["checks"].values())
        summary = "unavailable" if not ready else "degraded" if degraded else "ok"
        return (200 if ready else 503), {"status": summary, "live": True, "ready": ready}

    async def _status(self) -> tuple[int, dict[str, Any]]:
        ready, readiness = await self.readiness()
        details = await self.lifespan.status() if self.lifespan is not None else {}
        return 200, {"version": self.version, "ready": ready, **details, **readiness}

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the service is ready, and the body ``/health/ready`` answers with."""
        lifespan = self.lifespan
        if lifespan is None:
            return True, {"status": "ready", "checks": {}}
        if lifespan.state != "ready":
            # Starting, draining, stopping...: not ready whatever the checks say; skip them.
            return False, {"status": lifespan.state, "checks": {}}
        results = await self._check_results(lifespan)
        down = lifespan.tasks_down
        ready = not down and all(r.ok for r in results.values() if r.critical)
        checks = {
            name: {
                "status": r.status,
                "critical": r.critical,
                "duration_ms": round(r.duration * 1000, 3),
                **({"error": r.error} if r.error else {}),
            }
            for name, r in results.items()
        }
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": checks}
        if down:
            body["tasks_down"] = down
        return ready, body

    async def _check_results(self, lifespan: Lifespan) -> dict[str, CheckResult]:
        while True:
            cached = self._cached
            if cached is not None and self.clock() - cached[0] < self.cache_ttl:
                return cached[1]
            if self._running is None:
                break
            await self._running.wait()  # another probe is running the checks: share its run
            if self._cached is not None and self._cached is not cached:
                return self._cached[1]
        self._running = running = anyio.Event()
        try:
            results = await lifespan.run_checks()
            self._cached = (self.clock(), results)
            metrics = lifespan.metrics
            gauge = metrics.feature(HealthCollectors).health_check_up
            for name, result in results.items():
                metrics.child(gauge, name).set(1 if result.ok else 0)
        finally:
            self._running = None
            running.set()
        return results


async def _send_json(scope: Scope, send: Send, status: int, body: dict[str, Any]) -> None:
    context = RequestContext.current()
    if context is not None:
        context.mark_ours()  # a 503 readiness answer is ours: not an error to rewrite
    payload = json.dumps(body, separators=(",", ":"), default=str).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    head = scope["method"] == "HEAD"
    await send({"type": "http.response.body", "body": b"" if head else payload})
