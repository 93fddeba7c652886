"""``RateLimitMiddleware``: decide each request before the app sees it; IETF and legacy headers."""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from time import monotonic
from typing import Any, Literal

import anyio
from prometheus_client import CollectorRegistry

from .._checks import check_mapping, check_registry, check_seconds
from ..context import ContextMiddleware, PathSet, RequestContext, path_matcher, route_path
from ..metrics import Metrics
from ..problems import send_error
from ..proxies import TrustedProxies
from ..types import ASGIApp, Receive, Scope, Send
from ._collectors import RateLimitCollectors
from .backends import Backend, MemoryBackend, backend_from_url
from .rates import Rate, parse_rates
from .strategies import Answer, Decision, State, Strategy, StrategyName, strategy_for

__all__ = ["KeyFunction", "RateLimitMiddleware"]

_logger = logging.getLogger("asgi_resilience.ratelimit")
KeyFunction = Callable[[Scope], "str | None"]
_ERROR_LOG_INTERVAL = 10.0  # seconds between two logs of a failing backend
# Header values for small counts and resets, formatted once: most responses need only these.
_CACHED_DIGITS = 4096
_DIGITS = tuple(b"%d" % number for number in range(_CACHED_DIGITS))
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class _Policy:
    """The rates that apply to a set of paths, the header parts that announce them, and how a
    ``MemoryBackend`` decides them: as a ``Decision`` (several rates; any other backend answers
    ``Decision``s too). A policy of one rate decided in memory is a ``_OneRatePolicy``."""

    name: str
    bucket: str
    rates: tuple[Rate, ...]
    match: Callable[[str], bool]
    policy_header: bytes
    state_prefixes: tuple[bytes, ...]
    ip_prefix: str  # the key of a client address, without the address
    # What MemoryBackend.decide_with applies (the strategy's decide or decide_rate) and to what.
    step: Callable[[State | None, float, Any, int], Answer[Any]]
    limit: Any
    # Headers that never change, built once: RateLimit-Policy, and the legacy limit of a
    # policy of one rate (with several, the tightest rate's is announced per request).
    policy_pair: tuple[bytes, bytes] = field(init=False)
    limit_pair: tuple[bytes, bytes] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy_pair", (b"ratelimit-policy", self.policy_header))
        limit = b"%d" % self.rates[0].amount
        object.__setattr__(self, "limit_pair", (b"x-ratelimit-limit", limit))

    @staticmethod
    def build(
        bucket: str, limit: str, match: Callable[[str], bool], strategy: Strategy, in_memory: bool
    ) -> _Policy:
        """The policy ``limit`` for ``bucket``, decided by ``strategy`` (``in_memory``: by a
        ``MemoryBackend``, a policy of one rate in plain numbers)."""
        rates = parse_rates(limit)
        # The draft's window is whole seconds: a fractional period is announced rounded up.
        header = ", ".join(f'"{r.name}";q={r.amount};w={math.ceil(r.period)}' for r in rates)
        prefixes = tuple(f'"{r.name}";r='.encode() for r in rates)
        name = "default" if bucket == "*" else bucket
        prefix = f"{bucket}|"
        parts = (name, prefix, rates, match, header.encode(), prefixes, prefix + "ip:")
        if in_memory and len(rates) == 1:
            return _OneRatePolicy(*parts, strategy.decide_rate, rates[0])
        return _Policy(*parts, strategy.decide, rates)

    def announce(self, answer: Any, reset_after: float, /) -> Headers:
        """The headers for what the backend answered: here a ``Decision``."""
        return self.headers(answer)

    def headers(self, decision: Decision) -> Headers:
        """``RateLimit-Policy``, ``RateLimit`` and the legacy headers for ``decision``."""
        statuses = decision.statuses
        if len(statuses) == 1:  # one rate, the common case: no joins, no search
            return self.one_rate_headers(statuses[0].remaining, statuses[0].reset_after)
        state = b", ".join(
            b"%s%d;t=%d" % (prefix, _whole(status.remaining), _whole(status.reset_after, up=True))
            for prefix, status in zip(self.state_prefixes, statuses, strict=True)
        )
        tightest = decision.tightest
        return [
            (b"ratelimit-policy", self.policy_header),
            (b"ratelimit", state),
            (b"x-ratelimit-limit", b"%d" % tightest.rate.amount),
            (b"x-ratelimit-remaining", b"%d" % _whole(tightest.remaining)),
            (b"x-ratelimit-reset", b"%d" % _whole(tightest.reset_after, up=True)),
        ]

    def one_rate_headers(self, remaining: int, reset_after: float, /) -> Headers:
        """``headers`` for a policy of one rate, from its numbers."""
        remaining = int(remaining) if remaining > 0 else 0  # see _whole
        reset = math.ceil(reset_after) if reset_after > 0 else 0
        remaining_text = _DIGITS[remaining] if remaining < _CACHED_DIGITS else b"%d" % remaining
        reset_text = _DIGITS[reset] if reset < _CACHED_DIGITS else b"%d" % reset
        return [
            self.policy_pair,
            (b"ratelimit", self.state_prefixes[0] + remaining_text + b";t=" + reset_text),
            self.limit_pair,
            (b"x-ratelimit-remaining", remaining_text),
            (b"x-ratelimit-reset", reset_text),
        ]


@dataclass(frozen=True)
class _OneRatePolicy(_Policy):
    """A policy of one rate decided by a ``MemoryBackend``: in plain numbers (``decide_rate``:
    requests remaining, seconds to reset), no objects built. The rate limiter's default."""

    announce = _Policy.one_rate_headers


def _whole(number: float, *, up: bool = False) -> int:
    """A header's count or seconds: whole (a custom backend may answer floats), never negative
    (a window counted under a higher limit than today's leaves fewer than none remaining)."""
    if number <= 0:
        return 0
    return math.ceil(number) if up else int(number)


class RateLimitMiddleware(ContextMiddleware):
    """Limit request rates per client before the application runs.

    Handles ``http`` scopes; WebSocket and lifespan pass through (so do streaming responses of
    admitted requests, untouched but for the added headers). Limits such as
    ``"10/second;1000/hour"`` must all pass; a denied request consumes nothing. ``routes`` gives
    other limits to route templates (``"/items/{item_id}"``: every item shares one budget) or
    path prefixes (``"/admin"``), first match wins; ``exempt_paths`` are never limited.

    Writes on every limited response ``RateLimit-Policy`` (``"100-per-60s";q=100;w=60``) and
    ``RateLimit`` (``"100-per-60s";r=42;t=17``) per the IETF draft, the legacy
    ``X-RateLimit-Limit/-Remaining/-Reset`` (seconds) of the tightest rate and, on 429, a
    ``Retry-After`` of at least the real wait (and at least 1 s). The headers are written where
    the response leaves the outermost of our layers (``RequestContext.add_response_headers``),
    so they are also on errors a layer outside renders. The 429 body is in the stack's
    error shape. Reads the forwarding header (``X-Forwarded-For`` by default; see
    ``TrustedProxies``) only from ``trusted_proxies`` (the resolved address is stored in the
    request context, shared with the access log). IPv6 clients are keyed per
    ``/ipv6_prefix`` network. Sets
    ``rate_limited`` on the request context. Place it inside the error layer and the built-in
    endpoints, outside envelopes.

    Args:
        app: the ASGI application.
        limit: the default limit for every path.
        strategy: ``"gcra"`` (smooth), ``"fixed-window"`` or ``"sliding-window"``.
        backend: a ``Backend``, or a URL (``"memory://"``, ``"redis://host:6379/0"``).
        key: who is limited: ``"ip"`` (the client address), ``"user"`` (``scope["user"]``, as
            set by authentication middleware), ``"header:<name>"`` (an API key), or a callable
            ``(scope) -> str | None``. A missing header, anonymous user, ``None`` or a failing
            callable fall back to the client address.
        trusted_proxies: proxy addresses/networks whose forwarding header is believed (a
            ``TrustedProxies`` to choose ``Forwarded`` instead of ``X-Forwarded-For``).
        routes: route template or path prefix -> limit.
        exempt_paths: paths (and their subpaths) never limited.
        cost: units each request consumes, or a callable ``(scope) -> int``.
        on_backend_error: ``"allow"`` (admit, logged and counted) or ``"deny"`` (503) when the
            backend fails or exceeds ``backend_timeout``.
        backend_timeout: seconds a decision may take.
        logger: where backend failures are reported (``asgi_resilience.ratelimit``).
        ipv6_prefix: IPv6 clients are limited per network of this prefix length (a /64 is
            one customer's LAN); IPv4-mapped addresses count as their IPv4 address.
        registry: the Prometheus registry for
            ``asgi_resilience_rate_limit_decisions_total{policy, outcome}`` (policy: the route
            key, ``default`` for the default limit).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: str = "100/minute",
        strategy: StrategyName = "gcra",
        backend: Backend | str = "memory://",
        key: str | KeyFunction = "ip",
        trusted_proxies: Iterable[str] | TrustedProxies = (),
        routes: Mapping[str, str] | None = None,
        exempt_paths: Iterable[str] = (),
        cost: int | Callable[[Scope], int] = 1,
        on_backend_error: Literal["allow", "deny"] = "allow",
        backend_timeout: float = 0.05,
        logger: logging.Logger | None = None,
        registry: CollectorRegistry | None = None,
        ipv6_prefix: int = 64,
    ) -> None:
        if on_backend_error not in ("allow", "deny"):
            raise ValueError(
                f"on_backend_error must be 'allow' or 'deny', got {on_backend_error!r}"
            )
        check_seconds("backend_timeout", backend_timeout)
        check_registry("registry", registry)
        if not isinstance(limit, str):
            raise ValueError(f"limit must be a rate such as '100/minute', got {limit!r}")
        check_mapping("routes", routes)
        if not callable(cost) and (not isinstance(cost, int) or isinstance(cost, bool) or cost < 1):
            raise ValueError(f"cost must be an integer >= 1 or a callable, got {cost!r}")
        if (
            not isinstance(ipv6_prefix, int)
            or isinstance(ipv6_prefix, bool)
            or not (1 <= ipv6_prefix <= 128)
        ):
            raise ValueError(f"ipv6_prefix must be between 1 and 128, got {ipv6_prefix!r}")
        self.ipv6_prefix = ipv6_prefix
        self.app = app
        self.strategy = strategy_for(strategy)
        self.backend = backend_from_url(backend) if isinstance(backend, str) else backend
        self.memory = memory = self.backend if isinstance(self.backend, MemoryBackend) else None
        self.key = _key_function(key)
        self.proxies = TrustedProxies.of(trusted_proxies)
        policy = partial(_Policy.build, strategy=self.strategy, in_memory=memory is not None)
        self.policies = tuple(
            policy(route, route_limit, path_matcher(route, option="routes"))
            for route, route_limit in (routes or {}).items()
        )
        self.default_policy = policy("*", limit, lambda path: True)
        self.exempt = PathSet(exempt_paths, option="exempt_paths")
        self.exempting = bool(self.exempt.exact)
        self.cost = cost
        self.deny_on_error = on_backend_error == "deny"
        self.backend_timeout = backend_timeout
        self.logger = logger if logger is not None else _logger
        self.metrics = Metrics.for_registry(registry)
        decisions = self.metrics.feature(RateLimitCollectors).rate_limit_decisions
        self._outcomes = {
            policy.bucket: tuple(
                decisions.labels(policy.name, outcome)
                for outcome in ("allowed", "limited", "error")
            )
            for policy in (*self.policies, self.default_policy)
        }
        # Another backend's decisions are awaited, within backend_timeout.
        self.decide_later = getattr(self.backend, "decide_within", None) or self._decide_within
        self.backend_errors = 0
        self._unreported_errors = 0
        self._last_error: Exception | None = None
        self._last_error_log = -math.inf
        self.uniform = not (self.policies or self.exempting or self.proxies or callable(cost))

    async def handle(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if self.uniform:  # one policy, no exemptions, no proxies, a fixed cost: the default
            policy = self.default_policy
            client = context.client
            cost: int = self.cost  # type: ignore[assignment]
        else:
            path = route_path(scope)
            if self.exempting and path in self.exempt:
                await self.app(scope, receive, send)
                return
            policy = self._policy_for(path) if self.policies else self.default_policy
            client = self.proxies.apply(context, scope) if self.proxies else context.client
            cost = self.cost if isinstance(self.cost, int) else self._cost(scope)
        if self.key is not None:
            key = policy.bucket + self._identity(scope, client)
        elif client is not None and ":" not in client:
            key = policy.ip_prefix + client  # IPv4, the common case
        else:
            key = policy.bucket + self._ip(client)
        shown: Any  # what policy.announce reads: the numbers of one rate, or a Decision
        try:
            if self.memory is not None:  # decided in place: no coroutine, no timeout
                allowed, shown, reset_after, retry_after = self.memory.decide_with(
                    policy.step, key, policy.limit, cost
                )
            else:
                decision = await self.decide_later(
                    self.backend_timeout, self.strategy, key, policy.rates, cost
                )
                allowed, shown, reset_after, retry_after = (
                    decision.allowed,
                    decision,
                    0.0,
                    decision.retry_after,
                )
        except Exception as exc:
            self._outcomes[policy.bucket][2].inc()
            self._report_backend_error(exc)
            context.rate_limited = "error"
            if self.deny_on_error:
                detail = "Rate limiting is unavailable"
                await send_error(context, scope, send, 503, detail=detail)
            else:
                await self.app(scope, receive, send)
            return
        headers = policy.announce(shown, reset_after)
        context.rate_limited = not allowed
        if self._unreported_errors:  # failures held back by the warning's interval
            self._report_backend_error(None)
        self._outcomes[policy.bucket][0 if allowed else 1].inc()
        # On whatever response goes out: the app's, a 429, an error rendered outside.
        context.add_response_headers(headers)
        send = context.record(send)
        if allowed:
            await self.app(scope, receive, send)
        else:
            await self._send_429(context, scope, send, retry_after)

    async def _decide_within(
        self, seconds: float, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        """``decide`` of a backend that does not bound its own wait (``decide_within``)."""
        with anyio.fail_after(seconds):
            return await self.backend.decide(strategy, key, rates, cost)

    async def _send_429(
        self, context: RequestContext, scope: Scope, send: Send, retry_after: float
    ) -> None:
        if "route" not in scope:  # refused before routing: name the route it would have taken
            _name_route(self.app, scope)
        headers = []
        if math.isfinite(retry_after):
            seconds = max(1, math.ceil(retry_after))
            headers.append((b"retry-after", b"%d" % seconds))
            detail = f"Rate limit exceeded; retry in {seconds} s"
        else:
            detail = "This request costs more than the rate limit allows"
        await send_error(context, scope, send, 429, detail=detail, headers=headers)

    def _policy_for(self, path: str) -> _Policy:
        for policy in self.policies:
            if policy.match(path):
                return policy
        return self.default_policy

    def _identity(self, scope: Scope, client: str | None) -> str:
        assert self.key is not None
        try:
            identity = self.key(scope)
        except Exception:
            self.logger.exception("Rate limit key function failed; limiting by client address")
            identity = None
        return identity if identity else self._ip(client)

    def _ip(self, client: str | None) -> str:
        """The client-address key: IPv6 clients by their ``/ipv6_prefix`` network, since one
        host usually holds a whole /64 and could otherwise rotate through it."""
        if client is None or ":" not in client:
            return f"ip:{client}"
        try:
            address = ipaddress.IPv6Address(client)
        except ValueError:
            return f"ip:{client}"
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        network = ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False)
        return f"ip:{network}"

    def _cost(self, scope: Scope) -> int:
        assert callable(self.cost)
        try:
            cost = int(self.cost(scope))
        except Exception:
            self.logger.exception("Rate limit cost function failed; counting 1")
            return 1
        return max(1, cost)

    def _report_backend_error(self, exc: Exception | None) -> None:
        """Count a failed decision (``exc``) and warn at most once per 10 s, with the number of
        failures since the previous warning: the first failure at once, the ones held back
        with the next decision after the interval (failed or not), so none goes unreported."""
        if exc is not None:
            self.backend_errors += 1
            self._unreported_errors += 1
            self._last_error = exc
        now = monotonic()
        if now - self._last_error_log < _ERROR_LOG_INTERVAL:
            return
        failures, self._unreported_errors = self._unreported_errors, 0
        since = (
            "" if self._last_error_log == -math.inf else f" in {now - self._last_error_log:.0f} s"
        )
        self._last_error_log = now
        error = self._last_error
        self.logger.warning(
            "Rate limit backend failed %d time%s%s, %s; last error: %s",
            failures,
            "" if failures == 1 else "s",
            since,
            "denying" if self.deny_on_error else "allowing",
            "timed out" if isinstance(error, TimeoutError) else str(error) or repr(error),
        )


def _name_route(app: Any, scope: Scope) -> None:
    """Put the route ``scope`` would reach in ``app`` into ``scope["route"]`` (and its router
    into ``scope["router"]``), as Starlette's router does, so that a refused request is recorded
    under its route template. Only refused requests pay for this match; admitted ones are
    routed by the application itself. Apps without a Starlette router are left as they are."""
    router = _router_of(app)
    if router is None:
        return
    from starlette.routing import Match, Mount

    routes, child = router.routes, dict(scope)
    for _ in range(16):  # Mounts within Mounts, as deep as any real app goes
        for route in routes:
            try:
                match, found = route.matches(child)
            except Exception:  # a custom route that cannot match this scope
                continue
            if match is Match.FULL:
                break
        else:
            return
        child.update(found)
        if isinstance(route, Mount) and route.routes:
            routes = route.routes
            continue
        scope["route"], scope["router"] = route, scope.get("router", router)
        return


def _router_of(app: Any) -> Any:
    """The Starlette ``Router`` of the first app in the chain of ``.app`` attributes that has one
    (Starlette and FastAPI apps, middleware around them)."""
    from starlette.routing import Router

    for _ in range(32):
        if isinstance(app, Router):
            return app
        router = getattr(app, "router", None)
        if isinstance(router, Router):
            return router
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _key_function(key: str | KeyFunction) -> KeyFunction | None:
    """The key callable; ``None`` for the client address (the fast, common case)."""
    if callable(key):
        return key
    if key == "ip":
        return None
    if key == "user":
        return _user_key
    if key.lower().startswith("header:") and key[7:].strip():
        name = key[7:].strip().lower().encode("latin-1")
        return lambda scope: _header_key(scope, name)
    raise ValueError(f"key must be 'ip', 'user', 'header:<name>' or a callable, got {key!r}")


def _header_key(scope: Scope, name: bytes) -> str | None:
    for header, value in scope["headers"]:
        if header == name and value:
            return "key:" + bytes(value).decode("latin-1")
    return None


def _user_key(scope: Scope) -> str | None:
    user: Any = scope.get("user")
    if user is None or not getattr(user, "is_authenticated", True):
        return None
    identity = getattr(user, "identity", None) or getattr(user, "username", None) or str(user)
    return f"user:{identity}"
