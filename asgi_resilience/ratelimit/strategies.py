"""Rate limiting algorithms, each twice: in Python (the memory backend) and in Lua (Redis).

A strategy is a pure function of the stored state, the time, the rates and the cost: it returns
the decision and, when the request is admitted, the new state and how long to keep it. Several
rates are all-or-nothing: a request denied by one consumes nothing from the others. The Lua
versions follow the Python ones line by line (same operations, same order, IEEE doubles on
both sides), so both backends give the same answers; the tests hold them to that.

- ``gcra``: Generic Cell Rate Algorithm; one timestamp per rate, smooth, bursts up to the rate.
- ``fixed-window``: a counter per calendar window; cheap, allows 2x at a window edge.
- ``sliding-window``: the current and previous window counters, the previous one weighted by
  how much of it still overlaps the sliding window; close to a true sliding log at O(1) cost.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal, NamedTuple

from .rates import Rate

__all__ = [
    "GCRA",
    "Decision",
    "FixedWindow",
    "RateStatus",
    "SlidingWindow",
    "Strategy",
    "StrategyName",
    "strategy_for",
]

StrategyName = Literal["gcra", "fixed-window", "sliding-window"]
EPSILON = 1e-6  # seconds: float noise never decides a request
_new = tuple.__new__
State = list[float]


class RateStatus(NamedTuple):
    """Where one rate stands after a decision: requests left, seconds until fully reset."""

    rate: Rate
    remaining: int
    reset_after: float


class Decision(NamedTuple):
    """The answer for one request.

    Attributes:
        allowed: admit the request.
        statuses: one per rate, in the order given.
        retry_after: when denied, seconds until the same request would be admitted
            (``math.inf`` if never: its cost exceeds a rate's amount); 0 when allowed.
    """

    allowed: bool
    statuses: tuple[RateStatus, ...]
    retry_after: float = 0.0

    @property
    def tightest(self) -> RateStatus:
        """The status with the fewest requests left (the longest reset among equals)."""
        statuses = self.statuses
        if len(statuses) == 1:
            return statuses[0]
        return min(statuses, key=lambda s: (s.remaining, -s.reset_after))


# What every script starts with (the time: Redis' own unless the caller passes one; the cost;
# the number of rates; the stored state) and ends with (store the new state if admitted, and
# reply: allowed, retry_after, then remaining and reset_after per rate). Floats travel as
# strings: Redis would truncate Lua numbers in replies to integers.
_LUA_PRELUDE = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local cost = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local eps = 0.000001
local stored = redis.call('GET', KEYS[1])
local state = {}
if stored then
  for value in string.gmatch(stored, '%S+') do state[#state + 1] = tonumber(value) end
end
"""
_LUA_REPLY = """
local chosen = after
if allowed == 1 then
  redis.call('SET', KEYS[1], table.concat(new_state, ' '), 'PX', math.ceil(ttl * 1000) + 1)
else
  chosen = before
end
local reply = {allowed, string.format('%.17g', retry_after)}
for i = 1, n do
  reply[#reply + 1] = chosen[i][1]
  reply[#reply + 1] = string.format('%.17g', chosen[i][2])
end
return reply
"""


class Strategy(ABC):
    """An algorithm: ``decide`` in Python, ``lua`` for Redis (same inputs, same answers)."""

    name: ClassVar[StrategyName]
    slots: ClassVar[int]  # stored numbers per rate
    lua: ClassVar[str]

    @abstractmethod
    def decide(
        self, state: Sequence[float] | None, now: float, rates: Sequence[Rate], cost: int
    ) -> tuple[Decision, State | None, float]:
        """Return the decision, the state to store (``None``: keep the old one) and its TTL."""


class GCRA(Strategy):
    """Generic Cell Rate Algorithm: a theoretical arrival time (TAT) per rate."""

    name = "gcra"
    slots = 1

    def decide(
        self, state: Sequence[float] | None, now: float, rates: Sequence[Rate], cost: int
    ) -> tuple[Decision, State | None, float]:
        if len(rates) == 1:  # the common case, without the loops
            rate = rates[0]
            new_tat, remaining, reset_after, wait = self.decide_one(
                state[0] if state else None, now, rate, cost
            )
            # tuple.__new__: what the NamedTuples' own __new__ (a Python function) ends in.
            status = _new(RateStatus, (rate, remaining, reset_after))
            if new_tat is None:
                return _new(Decision, (False, (status,), wait)), None, 0.0
            return _new(Decision, (True, (status,), 0.0)), [new_tat], reset_after
        allowed, retry_after = True, 0.0
        tats = []
        new_state: State = []
        state = _padded(state, len(rates))
        for index, rate in enumerate(rates):
            stored = state[index] if state else now
            tat = stored if stored > now else now  # NaN (nothing stored) is no TAT
            new_tat = tat + cost * rate.interval
            allow_at = new_tat - rate.period
            if allow_at > now + EPSILON:
                allowed = False
                wait = math.inf if cost > rate.amount else allow_at - now
                retry_after = max(retry_after, wait)
            tats.append(tat)
            new_state.append(new_tat)
        # Report every rate as it stands: untouched when denied, consumed when admitted.
        shown = new_state if allowed else tats
        statuses = tuple(
            RateStatus(rate, _count(rate.period - (tat - now), rate.interval), tat - now)
            for rate, tat in zip(rates, shown, strict=True)
        )
        if not allowed:
            return Decision(False, statuses, retry_after), None, 0.0
        return Decision(True, statuses), new_state, max(new_state) - now

    @staticmethod
    def decide_one(
        tat: float | None, now: float, rate: Rate, cost: int
    ) -> tuple[float | None, int, float, float]:
        """One rate in plain numbers, from its stored TAT (``None``: none stored): the new TAT
        (``None``: denied, nothing to store), the requests remaining, the seconds until the
        rate is fully reset and, when denied, the seconds to wait. ``decide`` for one rate,
        and the memory backend's way around the ``Decision`` objects (``decide_gcra``)."""
        if tat is None or not tat > now:
            tat = now
        new_tat = tat + cost * rate.interval
        allow_at = new_tat - rate.period
        if allow_at > now + EPSILON:
            wait = math.inf if cost > rate.amount else allow_at - now
            return None, _count(rate.period - (tat - now), rate.interval), tat - now, wait
        reset_after = new_tat - now
        remaining = math.floor((rate.period - reset_after) / rate.interval + EPSILON)
        return new_tat, remaining if remaining > 0 else 0, reset_after, 0.0

    lua = (
        _LUA_PRELUDE
        + """
local allowed, retry_after, ttl = 1, 0, 0
local new_state, before, after = {}, {}, {}
for i = 1, n do
  local amount = tonumber(ARGV[2 + 2 * i])
  local period = tonumber(ARGV[3 + 2 * i])
  local interval = period / amount
  local tat = now
  if state[i] ~= nil and state[i] > now then tat = state[i] end
  local new_tat = tat + cost * interval
  local allow_at = new_tat - period
  if allow_at > now + eps then
    allowed = 0
    local wait = allow_at - now
    if cost > amount then wait = -1 end
    if wait < 0 or (retry_after >= 0 and wait > retry_after) then retry_after = wait end
  end
  before[i] = {math.max(0, math.floor((period - (tat - now)) / interval + eps)), tat - now}
  after[i] = {math.max(0, math.floor((period - (new_tat - now)) / interval + eps)), new_tat - now}
  new_state[i] = string.format('%.17g', new_tat)
  if new_tat - now > ttl then ttl = new_tat - now end
end
"""
        + _LUA_REPLY
    )


class FixedWindow(Strategy):
    """A counter per window of ``period`` seconds, aligned to multiples of the period."""

    name = "fixed-window"
    slots = 2

    def decide(
        self, state: Sequence[float] | None, now: float, rates: Sequence[Rate], cost: int
    ) -> tuple[Decision, State | None, float]:
        allowed, retry_after, ttl = True, 0.0, 0.0
        new_state: State = []
        before, after = [], []
        state = _padded(state, 2 * len(rates))
        for index, rate in enumerate(rates):
            window = math.floor(now / rate.period)
            count = 0.0
            if state and state[2 * index] == window:
                count = state[2 * index + 1]
            reset_after = (window + 1) * rate.period - now
            if count + cost > rate.amount:
                allowed = False
                retry_after = max(retry_after, math.inf if cost > rate.amount else reset_after)
            before.append(RateStatus(rate, int(rate.amount - count), reset_after))
            after.append(RateStatus(rate, max(0, int(rate.amount - count - cost)), reset_after))
            new_state += [window, count + cost]
            ttl = max(ttl, reset_after)
        if not allowed:
            return Decision(False, tuple(before), retry_after), None, 0.0
        return Decision(True, tuple(after)), new_state, ttl

    lua = (
        _LUA_PRELUDE
        + """
local allowed, retry_after, ttl = 1, 0, 0
local new_state, before, after = {}, {}, {}
for i = 1, n do
  local amount = tonumber(ARGV[2 + 2 * i])
  local period = tonumber(ARGV[3 + 2 * i])
  local window = math.floor(now / period)
  local count = 0
  if state[2 * i - 1] == window then count = state[2 * i] end
  local reset_after = (window + 1) * period - now
  if count + cost > amount then
    allowed = 0
    local wait = reset_after
    if cost > amount then wait = -1 end
    if wait < 0 or (retry_after >= 0 and wait > retry_after) then retry_after = wait end
  end
  before[i] = {amount - count, reset_after}
  after[i] = {math.max(0, amount - count - cost), reset_after}
  new_state[2 * i - 1] = string.format('%.17g', window)
  new_state[2 * i] = string.format('%.17g', count + cost)
  if reset_after > ttl then ttl = reset_after end
end
"""
        + _LUA_REPLY
    )


class SlidingWindow(Strategy):
    """Sliding window counter: ``previous * (1 - elapsed / period) + current`` requests."""

    name = "sliding-window"
    slots = 3

    def decide(
        self, state: Sequence[float] | None, now: float, rates: Sequence[Rate], cost: int
    ) -> tuple[Decision, State | None, float]:
        allowed, retry_after, ttl = True, 0.0, 0.0
        new_state: State = []
        before, after = [], []
        state = _padded(state, 3 * len(rates))
        for index, rate in enumerate(rates):
            amount, period = rate.amount, rate.period
            window = math.floor(now / period)
            elapsed = now - window * period
            previous = current = 0.0
            if state and state[3 * index] == window:
                previous, current = state[3 * index + 1], state[3 * index + 2]
            elif state and state[3 * index] == window - 1:
                previous = state[3 * index + 2]
            estimate = previous * (1 - elapsed / period) + current
            if estimate + cost > amount + EPSILON:
                allowed = False
                retry_after = max(
                    retry_after, _sliding_wait(rate, elapsed, previous, current, cost)
                )
            reset_after = (
                2 * period - elapsed if current else (period - elapsed if previous else 0.0)
            )
            before.append(RateStatus(rate, _count(amount - estimate, 1), reset_after))
            after.append(
                RateStatus(rate, _count(amount - estimate - cost, 1), 2 * period - elapsed)
            )
            new_state += [window, previous, current + cost]
            ttl = max(ttl, 2 * period - elapsed)
        if not allowed:
            return Decision(False, tuple(before), retry_after), None, 0.0
        return Decision(True, tuple(after)), new_state, ttl

    lua = (
        _LUA_PRELUDE
        + """
local function wait_for(amount, period, elapsed, previous, current)
  if cost > amount then return -1 end
  if previous > 0 and current + cost <= amount then
    local t = period * (1 - (amount - cost - current) / previous) - elapsed
    if t < 0 then t = 0 end
    if t < period - elapsed then return t end
  end
  local e = 0
  if current > 0 then e = period * (1 - (amount - cost) / current) end
  if e < 0 then e = 0 end
  return (period - elapsed) + e
end
local allowed, retry_after, ttl = 1, 0, 0
local new_state, before, after = {}, {}, {}
for i = 1, n do
  local amount = tonumber(ARGV[2 + 2 * i])
  local period = tonumber(ARGV[3 + 2 * i])
  local window = math.floor(now / period)
  local elapsed = now - window * period
  local previous, current = 0, 0
  if state[3 * i - 2] == window then
    previous, current = state[3 * i - 1], state[3 * i]
  elseif state[3 * i - 2] == window - 1 then
    previous = state[3 * i]
  end
  local estimate = previous * (1 - elapsed / period) + current
  if estimate + cost > amount + eps then
    allowed = 0
    local wait = wait_for(amount, period, elapsed, previous, current)
    if wait < 0 or (retry_after >= 0 and wait > retry_after) then retry_after = wait end
  end
  local reset_after = 0
  if current > 0 then reset_after = 2 * period - elapsed
  elseif previous > 0 then reset_after = period - elapsed end
  before[i] = {math.max(0, math.floor(amount - estimate + eps)), reset_after}
  after[i] = {math.max(0, math.floor(amount - estimate - cost + eps)), 2 * period - elapsed}
  new_state[3 * i - 2] = string.format('%.17g', window)
  new_state[3 * i - 1] = string.format('%.17g', previous)
  new_state[3 * i] = string.format('%.17g', current + cost)
  if 2 * period - elapsed > ttl then ttl = 2 * period - elapsed end
end
"""
        + _LUA_REPLY
    )


def _sliding_wait(rate: Rate, elapsed: float, previous: float, current: float, cost: int) -> float:
    """Seconds until ``cost`` more fits under a sliding window rate (``math.inf``: never)."""
    amount, period = rate.amount, rate.period
    if cost > amount:
        return math.inf
    if previous > 0 and current + cost <= amount:
        # Within this window: the previous window's weight decays until the request fits.
        wait = max(0.0, period * (1 - (amount - cost - current) / previous) - elapsed)
        if wait < period - elapsed:
            return wait
    # In the next window the current count becomes the previous one and decays in turn.
    later = max(0.0, period * (1 - (amount - cost) / current)) if current > 0 else 0.0
    return (period - elapsed) + later


def _padded(state: Sequence[float] | None, length: int) -> Sequence[float] | None:
    """``state`` with NaN for the numbers it lacks (stored when the policy had fewer rates):
    NaN equals no window and exceeds no time, as the Lua scripts treat a missing number."""
    if state is None or len(state) >= length:
        return state
    return [*state, *[math.nan] * (length - len(state))]


def _count(capacity: float, unit: float) -> int:
    """Whole requests that fit in ``capacity`` (seconds or requests) of ``unit`` each."""
    return max(0, math.floor(capacity / unit + EPSILON))


_STRATEGIES: dict[str, type[Strategy]] = {
    "gcra": GCRA,
    "fixed-window": FixedWindow,
    "sliding-window": SlidingWindow,
}


def strategy_for(name: str) -> Strategy:
    """The strategy called ``name`` (``gcra``, ``fixed-window``, ``sliding-window``)."""
    try:
        return _STRATEGIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}: expected one of {', '.join(_STRATEGIES)}"
        ) from None
