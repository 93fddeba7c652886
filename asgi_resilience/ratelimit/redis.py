"""``RedisBackend``: rate limits shared by every process, one round trip per decision.

Needs the ``redis`` extra (redis-py's asyncio client, so asyncio only). Each strategy's Lua
script runs atomically in Redis with Redis' own clock (``TIME``), so processes with skewed
clocks agree and concurrent requests can never both take the last unit: a limit of N admits
exactly N. Scripts run by ``EVALSHA``; redis-py reloads one the server lost (``NOSCRIPT``).
Keys are ``<prefix>{<sha256>}``: client-derived values (addresses, API keys) never reach Redis
in clear, and the braces make every key its own cluster hash slot.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

from .backends import BackendError
from .rates import Rate
from .strategies import Decision, RateStatus, Strategy

__all__ = ["RedisBackend"]


class RedisBackend:
    """Rate limit state in Redis.

    Args:
        client: a ``redis.asyncio.Redis`` client (its connection pool is shared).
        prefix: prepended to every key.
        clock: seconds to use instead of Redis' clock (tests only).
    """

    def __init__(
        self,
        client: redis_asyncio.Redis,
        *,
        prefix: str = "asgi_resilience:rl:",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self._scripts: dict[str, Any] = {}

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 100, **options: Any) -> RedisBackend:
        """A backend with its own client for ``url`` (``redis://host:6379/0``).

        Its pool blocks when all ``max_connections`` are busy instead of failing at once (a
        burst would otherwise turn into backend errors, and with ``on_backend_error="allow"``
        into admitted requests); the middleware's ``backend_timeout`` bounds the wait. Give
        your own client a ``BlockingConnectionPool`` for the same reason.
        """
        pool = redis_asyncio.BlockingConnectionPool.from_url(url, max_connections=max_connections)
        return cls(redis_asyncio.Redis.from_pool(pool), **options)

    async def decide(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        script = self._scripts.get(strategy.name)
        if script is None:
            script = self._scripts[strategy.name] = self.client.register_script(strategy.lua)
        args: list[Any] = ["" if self.clock is None else repr(self.clock()), cost, len(rates)]
        for rate in rates:
            args += [rate.amount, repr(rate.period)]
        try:
            reply = await script(keys=[self.key_for(strategy, key, rates)], args=args)
            return _decision(reply, rates)
        except (RedisError, OSError, ValueError, IndexError, TypeError) as exc:
            raise BackendError(f"Redis rate limit decision failed: {exc!r}") from exc

    def key_for(self, strategy: Strategy, key: str, rates: Sequence[Rate]) -> str:
        """The Redis key for a client ``key`` under ``strategy`` and ``rates``."""
        spec = ";".join(f"{r.amount}/{r.period!r}" for r in rates)
        digest = hashlib.sha256(f"{strategy.name}|{spec}|{key}".encode()).hexdigest()
        return f"{self.prefix}{{{digest[:40]}}}"

    async def ping(self) -> None:
        """Check that Redis answers (the startup check ``resilient()`` registers)."""
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise BackendError(f"Redis is not reachable: {exc}") from exc

    async def aclose(self) -> None:
        await self.client.aclose()


def _decision(reply: Sequence[Any], rates: Sequence[Rate]) -> Decision:
    allowed = int(reply[0]) == 1
    retry_after = float(reply[1])
    statuses = tuple(
        RateStatus(rate, int(reply[2 + 2 * i]), float(reply[3 + 2 * i]))
        for i, rate in enumerate(rates)
    )
    if retry_after < 0:
        retry_after = math.inf  # the script's mark for "never": cost above the limit
    return Decision(allowed, statuses, 0.0 if allowed else retry_after)
