"""Where rate limit state lives: the ``Backend`` protocol, the memory backend, backend URLs."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ..exceptions import BackendError as BackendError
from .rates import Rate
from .strategies import GCRA, Decision, State, Strategy

__all__ = ["Backend", "BackendError", "MemoryBackend", "backend_from_url"]

_MAX_RAW_KEY = 64
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
        return self.decide_now(strategy, key, rates, cost)

    def decide_now(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        """``decide`` without awaiting: nothing here waits."""
        if len(key) > _MAX_RAW_KEY:
            key = _hashed(key)
        now = self.clock()
        entry = self._entries.get(key)
        state = entry[0] if entry is not None and entry[1] > now else None
        decision, new_state, ttl = strategy.decide(state, now, rates, cost)
        self._settle(key, entry, state is not None, new_state, now + ttl)
        return decision

    def decide_gcra(self, key: str, rate: Rate, cost: int) -> tuple[bool, int, float, float]:
        """``decide_now`` for GCRA and one rate, in plain numbers: ``(allowed, remaining,
        reset_after, retry_after)``. The rate limiter's default, on its hot path: the same
        state, kept the same way, without building a ``Decision``."""
        if len(key) > _MAX_RAW_KEY:
            key = _hashed(key)
        now = self.clock()
        entry = self._entries.get(key)
        state = entry[0] if entry is not None and entry[1] > now else None
        new_tat, remaining, reset_after, wait = GCRA.decide_one(
            state[0] if state else None, now, rate, cost
        )
        if new_tat is None:
            self._settle(key, entry, state is not None, None, now)
            return False, remaining, reset_after, wait
        entries = self._entries  # _settle's first case, inline: this is every admitted request
        entries[key] = ([new_tat], now + reset_after)
        entries.move_to_end(key)
        if len(entries) > self.max_keys:
            entries.popitem(last=False)
        return True, remaining, reset_after, 0.0

    def _settle(
        self,
        key: str,
        entry: tuple[State, float] | None,
        alive: bool,
        new_state: State | None,
        expires: float,
    ) -> None:
        """Store an admitted request's state; keep a refused client's (it is in use too: the
        most recently used end); drop an expired entry, now that it was looked at."""
        entries = self._entries
        if new_state is not None:
            entries[key] = (new_state, expires)  # a key already there keeps its place: move it
            entries.move_to_end(key)
            if len(entries) > self.max_keys:
                entries.popitem(last=False)
        elif entry is not None:
            if alive:
                entries.move_to_end(key)
            else:
                del entries[key]

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
