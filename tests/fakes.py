"""Test doubles shared by several test modules."""

from __future__ import annotations

import random


class FakeClock:
    """Seconds that move only when a test says so (a mutable float, read by calling it)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSleep:
    """An injectable ``sleep``: records the waits and moves ``clock`` instead of sleeping."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)


class HighestRandom(random.Random):
    """Jitter that always draws the top of its range."""

    def uniform(self, a: float, b: float) -> float:
        return b


class LowestRandom(random.Random):
    """Jitter that always draws zero."""

    def uniform(self, a: float, b: float) -> float:
        return a
