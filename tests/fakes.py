"""Test doubles shared by several test modules."""

from __future__ import annotations


class FakeClock:
    """Seconds that move only when a test says so (a mutable float, read by calling it)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
