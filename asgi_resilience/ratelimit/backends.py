"""Where rate limit state lives: the ``Backend`` protocol, the memory backend, backend URLs."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from ..exceptions import BackendError as BackendError
from .rates import Rate
from .strategies import Answer, Decision, State, Strategy

__all__ = ["Backend", "BackendError", "MemoryBackend", "backend_from_url"]

_MAX_RAW_KEY = 64
L = TypeVar("L")  # what a strategy decides for: a Rate, or a sequence of them
A = TypeVar("A")  # what it answers: the requests remaining, or a Decision
# The URL schemes backend_from_url opens: memory, and those RedisBackend.from_url takes.
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel")
BACKEND_SCHEMES = ("memory", *REDIS_SCHEMES)


@runtime_checkable
class Backend(Protocol):
    """Decides requests for a strategy, atomically per key.

    ``decide`` applies ``strategy`` to the state stored under ``key`` for ``rates`` and a
    request of ``cost``, stores the new state when admitted, and returns the decision. Errors
    are raised as ``BackendError``. ``aclose`` releases connections.
    """

    async def decide(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision: ...

    async def aclose(self) -> None: ...


class MemoryBackend:
    """In-process state: a bounded LRU map, expired lazily, no background task.

    At most ``max_keys`` keys are kept: the least recently used key is dropped first (it then
    starts afresh, with a full budget, if it comes back), so memory stays bounded whatever the
    number of clients. Expired entries are dropped when they are next looked at or evicted.
    Keys longer than 64 characters (API keys, ...) are stored as their SHA-256. Per process:
    with several workers each has its own counts; use Redis to share them.

    Args:
        max_keys: the most keys kept.
        clock: seconds, monotonic (injected in tests).
    """

    def __init__(
        self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.max_keys = max_keys
        self.clock = clock
        self._entries: OrderedDict[str, tuple[State, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def decide(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        return self.decide_with(strategy.decide, key, rates, cost)[1]

    def decide_now(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        """``decide`` without awaiting: nothing here waits."""
        return self.decide_with(strategy.decide, key, rates, cost)[1]

    def decide_with(
        self,
        decide: Callable[[State | None, float, L, int], Answer[A]],
        key: str,
        limit: L,
        cost: int,
    ) -> tuple[bool, A, float, float]:
        """Apply ``decide`` to the state stored under ``key``, keep the numbers it returns, and
        return ``(allowed, answer, seconds, retry_after)``. ``decide`` is one of the strategy's
        two: ``decide_rate`` for one rate (answers the requests remaining, and the seconds until
        the rate is reset; no objects built: the rate limiter's path), or ``decide`` for several
        (answers a ``Decision``). A refused client's entry is in use too: it moves to the most
        recently used end as an admitted one's does; an expired one is dropped, now looked at."""
        if len(key) > _MAX_RAW_KEY:
            key = _hashed(key)
        now = self.clock()
        entries = self._entries
        entry = entries.get(key)
        state = None
        if entry is not None:
            if entry[1] > now:
                state = entry[0]
                entries.move_to_end(key)
            else:
                del entries[key]
        new_state, answer, keep, wait = decide(state, now, limit, cost)
        if new_state is None:
            return False, answer, keep, wait
        entries[key] = (new_state, now + keep)
        if len(entries) > self.max_keys:
            entries.popitem(last=False)
        return True, answer, keep, wait

    async def aclose(self) -> None:
        self._entries.clear()


def _hashed(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def backend_from_url(url: str) -> Backend:
    """``"memory://"`` or ``"redis://host:6379/0"`` (``rediss://``, ``unix://``,
    ``redis+cluster://`` and ``redis+sentinel://`` too).

    Raises:
        ValueError: an unknown scheme.
        ImportError: a Redis URL without the ``redis`` extra installed.
    """
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryBackend()
    if scheme in REDIS_SCHEMES:
        from .redis import RedisBackend

        return RedisBackend.from_url(url)
    raise ValueError(f"unknown rate limit backend {url!r}: expected 'memory://' or 'redis://...'")
