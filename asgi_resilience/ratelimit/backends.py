"""Where rate limit state lives: the ``Backend`` protocol, the memory backend, backend URLs."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ..exceptions import AsgiResilienceError
from .rates import Rate
from .strategies import Decision, State, Strategy

__all__ = ["Backend", "BackendError", "MemoryBackend", "backend_from_url"]

_MAX_RAW_KEY = 64


class BackendError(AsgiResilienceError):
    """The rate limit backend failed (unreachable, timed out, answered nonsense)."""


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
            key = hashlib.sha256(key.encode()).hexdigest()
        now = self.clock()
        entries = self._entries
        entry = entries.get(key)
        state = entry[0] if entry is not None and entry[1] > now else None
        decision, new_state, ttl = strategy.decide(state, now, rates, cost)
        if new_state is not None:
            entries[key] = (new_state, now + ttl)  # a key already there keeps its place: move it
            entries.move_to_end(key)
            if len(entries) > self.max_keys:
                entries.popitem(last=False)
        elif entry is not None:
            if state is None:
                del entries[key]  # expired: dropped as soon as it is looked at
            else:
                entries.move_to_end(key)  # a refused client is in use too: keep its state
        return decision

    async def aclose(self) -> None:
        self._entries.clear()


def backend_from_url(url: str) -> Backend:
    """``"memory://"`` or ``"redis://host:6379/0"`` (``rediss://``, ``unix://`` too).

    Raises:
        ValueError: an unknown scheme.
        ImportError: a Redis URL without the ``redis`` extra installed.
    """
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryBackend()
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisBackend

        return RedisBackend.from_url(url)
    raise ValueError(f"unknown rate limit backend {url!r}: expected 'memory://' or 'redis://...'")
