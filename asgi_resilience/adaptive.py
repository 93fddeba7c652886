"""``AdaptiveLimit``: a concurrency limit that follows the application's latency.

The algorithm is TCP Vegas as Netflix's concurrency-limits applies it to servers (its
``VegasLimit``): latency at no load is the baseline; the extra latency of a window of requests
says how many of them were queueing inside the application rather than working, and the limit
moves to keep that queue small. Written here because no Python library offers one; Envoy's
adaptive concurrency filter and concurrency-limits' Gradient2 are the same idea with other
estimators.
"""

from __future__ import annotations

from collections import deque

__all__ = ["AdaptiveLimit"]

# Vegas' thresholds, as shares of the limit (concurrency-limits uses 3 and 6 log10(limit),
# which overshoots a small capacity by half): the queue inside the application is kept between
# 10% and 20% of the limit, and the limit moves 5% a window (at least one request).
_LEAST_QUEUED, _MOST_QUEUED, _STEP = 0.1, 0.2, 0.05


class AdaptiveLimit:
    """A limit between ``min_limit`` and ``max_limit`` fed one latency sample per request.

    Samples are grouped in windows of ``window`` requests. For each window, with ``baseline``
    the latency at no load (below) and ``latency`` the window's average,
    ``queue = limit * (1 - baseline / latency)`` estimates the requests that waited inside the
    application. A queue below 10% of the limit (at least 1) raises the limit by 5%
    (at least 1; only if the window kept at least half the limit busy: an idle service learns
    nothing about its capacity); a queue above 20% (at least 2) lowers it by as much, or
    straight to where the measured latency says the queue would be 15%, whichever is lower.
    The limit settles a few requests above the concurrency the application serves at its
    unloaded latency, backs off when latency rises and recovers when it falls.

    The baseline is the lowest window average of the last ``baseline_windows`` windows:
    averages, so that one fast request (a cache hit, a 404) does not set it; the last windows
    only, so that an application that became slower for good is measured anew once its faster
    windows have passed. It is learnt from the service's lighter moments: a service started
    straight into overload measures only loaded windows, and its limit then grows towards
    ``max_limit`` (warm the service up first, or keep ``max_limit`` near a safe value).

    Args:
        min_limit: the floor.
        max_limit: the ceiling.
        initial: the starting limit (20 within the bounds by default).
        window: samples per adjustment.
        baseline_windows: windows the baseline is the lowest average of.
    """

    def __init__(
        self,
        *,
        min_limit: int = 1,
        max_limit: int = 1000,
        initial: int | None = None,
        window: int = 20,
        baseline_windows: int = 100,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(
                f"need 1 <= min_limit <= max_limit, got min_limit={min_limit}, "
                f"max_limit={max_limit}"
            )
        if window < 1 or baseline_windows < 1:
            raise ValueError(
                f"window and baseline_windows must be >= 1, got {window!r}, {baseline_windows!r}"
            )
        self.min_limit, self.max_limit = min_limit, max_limit
        start = 20 if initial is None else initial
        self._limit = float(min(max_limit, max(min_limit, start)))
        self.window = window
        self._averages: deque[float] = deque(maxlen=baseline_windows)
        self._total = 0.0
        self._count = 0
        self._busiest = 0

    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def baseline(self) -> float | None:
        """The latency at no load, as far as measured (``None`` before the first window)."""
        return min(self._averages) if self._averages else None

    def observe(self, latency: float, in_flight: int) -> None:
        """One request took ``latency`` seconds with ``in_flight`` requests inside."""
        if not latency > 0:
            return  # a clock that did not move says nothing
        self._total += latency
        self._count += 1
        self._busiest = max(self._busiest, in_flight)
        if self._count >= self.window:
            self._adjust()

    def _adjust(self) -> None:
        average = self._total / self._count
        busy = self._busiest * 2 >= self._limit
        self._total, self._count, self._busiest = 0.0, 0, 0
        self._averages.append(average)
        baseline = min(self._averages)
        limit = self._limit
        queue = limit * (1 - baseline / average)
        step = max(1.0, limit * _STEP)
        if queue > max(2.0, limit * _MOST_QUEUED):
            # Far above: straight to the limit whose queue the latency says would be moderate,
            # not 5% a window (a cold start at 20 on a service that holds 4 would take dozens).
            moderate = limit * baseline / average * (1 + (_LEAST_QUEUED + _MOST_QUEUED) / 2)
            limit = min(limit - step, moderate)
        elif queue < max(1.0, limit * _LEAST_QUEUED) and busy:
            limit += step
        self._limit = min(float(self.max_limit), max(float(self.min_limit), limit))
