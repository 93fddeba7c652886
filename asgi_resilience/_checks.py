"""Option checks shared by the middlewares and the lifespan: a wrong value is a ``ValueError``
that names the option and says what it takes, never a ``TypeError`` from deep inside."""

from __future__ import annotations

import math


def check_seconds(option: str, value: object, *, zero: bool = False) -> float:
    """``value`` as a finite number of seconds (> 0, or >= 0 with ``zero``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(
            f"{option} must be a number of seconds {bound} (such as 5 or 0.5), got {value!r}"
        )
    return float(value)
