"""Timestamps as every JSON line and body writes them: ISO 8601 UTC with milliseconds,
formatted once a second. Private: ``asgi_resilience.context`` exports the functions."""

from __future__ import annotations

import math
from time import gmtime, strftime, time

_timestamp_cache: tuple[float, str] = (math.inf, "")  # (second, its date and time)
_MILLISECONDS = (*(f".{millis:03d}Z" for millis in range(1000)), ".999Z")


def utc_timestamp() -> str:
    """The current UTC time as ISO 8601 with milliseconds: ``2026-01-31T12:00:00.123Z``."""
    return format_timestamp(time())


def format_timestamp(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 UTC with milliseconds (``...T12:00:00.123Z``)."""
    global _timestamp_cache
    cache = _timestamp_cache  # one read: threads (log handlers) may replace it meanwhile
    fraction = seconds - cache[0]
    if not 0.0 <= fraction < 1.0:
        # Formatting the date and time is most of the cost; it changes once a second.
        whole = math.floor(seconds)  # down, before 1970 too: -0.25 is 23:59:59.750
        cache = _timestamp_cache = (whole, strftime("%Y-%m-%dT%H:%M:%S", gmtime(whole)))
        fraction = seconds - whole
    # + half a microsecond: 0.999 stays .999 (the table ends with .999 twice: never .1000).
    return cache[1] + _MILLISECONDS[int(fraction * 1000 + 0.0005)]
