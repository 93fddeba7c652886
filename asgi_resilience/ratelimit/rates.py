"""Rates: ``"100/minute"``, ``"10/second;1000/hour"``, ``"5/30 seconds"``, parsed once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Rate", "parse_rates"]

_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_RATE = re.compile(
    r"\s*(?P<amount>\d+)\s*(?:/|per)\s*(?P<multiple>\d+(?:\.\d+)?)?\s*(?P<unit>[a-z]+)\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Rate:
    """``amount`` requests per ``period`` seconds.

    Attributes:
        amount: requests (cost units) allowed per period.
        period: the period in seconds.
        name: the policy name in ``RateLimit``/``RateLimit-Policy`` headers.
    """

    amount: int
    period: float
    name: str
    interval: float = field(init=False, repr=False, compare=False)
    """Seconds between two requests at the steady rate (GCRA's emission interval)."""

    def __post_init__(self) -> None:
        if self.amount < 1:
            raise ValueError(f"a rate must allow at least 1 request, got {self.amount!r}")
        if not self.period > 0:
            raise ValueError(f"a rate's period must be positive, got {self.period!r}")
        object.__setattr__(self, "interval", self.period / self.amount)  # read per decision


def seconds_text(seconds: float) -> str:
    """``2592000`` for 30 days, ``0.5`` for half a second: never an exponent, which structured
    header fields do not allow."""
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:.6f}".rstrip("0").rstrip(".")


def _unit_seconds(unit: str) -> int | None:
    unit = unit.lower()
    if unit not in _UNITS and len(unit) > 2 and unit.endswith("s"):
        unit = unit[:-1]  # plurals: "seconds", "mins"; not "ms", which is no unit of ours
    return _UNITS.get(unit)


def parse_rates(text: str) -> tuple[Rate, ...]:
    """Parse ``"10/second;1000/hour"`` (``;`` or ``,`` between rates; all must pass).

    Units: second, minute, hour, day (also s, sec, m, min, h, d, plurals); an optional multiple
    (``"5/30 seconds"``). Each rate is named ``<amount>-per-<period>s`` for the headers.

    Raises:
        ValueError: with the offending part and the expected form.
    """
    rates = []
    for part in re.split(r"[;,]", text):
        if not part.strip():
            continue
        match = _RATE.fullmatch(part)
        unit = _unit_seconds(match.group("unit")) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"invalid rate {part.strip()!r} in {text!r}: expected '<count>/<unit>' such as "
                "'100/minute' or '5/30 seconds' (units: second, minute, hour, day)"
            )
        multiple = float(match.group("multiple") or 1)
        period = multiple * unit
        amount = int(match.group("amount"))
        rates.append(Rate(amount, period, f"{amount}-per-{seconds_text(period)}s"))
    if not rates:
        raise ValueError(f"no rate in {text!r}: expected e.g. '100/minute'")
    return tuple(rates)
