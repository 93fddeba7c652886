"""Rate limiting algorithms, each twice: in Python (the memory backend) and in Lua (Redis).

A strategy is a pure function of one rate's stored numbers, the time, the rate and the cost
(``decide_rate``): it returns the new numbers when the request is admitted, what remains, when
the rate is reset and how long to wait. ``Strategy.decide`` applies it to several rates, all or
nothing: a request denied by one consumes nothing from the others. Each algorithm's arithmetic
is written once in Python: the memory backend's one-rate path (the rate limiter's default) calls
``decide_rate`` itself. The Lua versions follow the Python ones (same operations, same order,
IEEE doubles on both sides), so both backends give the same answers; the tests hold them to that.

- ``gcra``: Generic Cell Rate Algorithm; one timestamp per rate, smooth, bursts up to the rate.
- ``fixed-window``: a counter per calendar window; cheap, allows 2x at a window edge.
- ``sliding-window``: the current and previous window counters, the previous one weighted by
  how much of it still overlaps the sliding window; close to a true sliding log at O(1) cost.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal, NamedTuple, TypeVar

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
T = TypeVar("T")
# What a strategy answers: the numbers to store (None: denied), the requests remaining (one
# rate) or the Decision (several), how long to keep the numbers, the seconds to wait.
Answer = tuple[State | None, T, float, float]


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
    """An algorithm for one rate, twice: ``decide_rate`` in Python, ``lua`` for Redis (same
    inputs, same answers). ``decide`` applies it to several rates, all or nothing."""

    name: ClassVar[StrategyName]
    slots: ClassVar[int]  # stored numbers per rate
    lua: ClassVar[str]

    @abstractmethod
    def decide_rate(
        self, state: Sequence[float] | None, now: float, rate: Rate, cost: int
    ) -> Answer[int]:
        """One rate, from its ``slots`` stored numbers (``None``: none stored): the numbers to
        store (``None``: denied, keep the old ones), the requests remaining, the seconds until
        the rate is fully reset (when admitted, also how long to keep the numbers) and, when
        denied, the seconds to wait (``math.inf``: never, the cost exceeds the rate's amount).
        A cost of 0 consumes nothing: its answer is where the rate stands."""

    def decide(
        self, state: Sequence[float] | None, now: float, rates: Sequence[Rate], cost: int
    ) -> Answer[Decision]:
        """``decide_rate`` for every one of ``rates``, each with its own numbers in ``state`` (one
        rate's after the other's): the numbers to store, the ``Decision``, how long to keep them
        and the seconds to wait. Every rate must admit the request; one denied consumes nothing
        from the others, and each rate then shows where it stands."""
        if len(rates) == 1:  # the rate's own answer, as a Decision
            rate = rates[0]
            stored, remaining, reset_after, wait = self.decide_rate(state, now, rate, cost)
            status = _new(RateStatus, (rate, remaining, reset_after))
            return stored, _new(Decision, (stored is not None, (status,), wait)), reset_after, wait
        slots = self.slots
        answers = []
        denied = False
        for index, rate in enumerate(rates):
            own = state[index * slots : index * slots + slots] if state else None
            answer = self.decide_rate(own, now, rate, cost)
            denied = denied or answer[0] is None
            answers.append((own, answer))
        new_state: State = []
        statuses = []
        ttl = retry_after = 0.0
        for rate, (own, (stored, remaining, reset_after, wait)) in zip(rates, answers, strict=True):
            if stored is None:
                retry_after = wait if wait > retry_after else retry_after
            elif denied:  # it would admit: where it stands is its answer at cost 0
                _, remaining, reset_after, _ = self.decide_rate(own, now, rate, 0)
            else:
                new_state += stored
                ttl = reset_after if reset_after > ttl else ttl
            statuses.append(_new(RateStatus, (rate, remaining, reset_after)))
        if denied:
            return None, _new(Decision, (False, tuple(statuses), retry_after)), 0.0, retry_after
        return new_state, _new(Decision, (True, tuple(statuses), 0.0)), ttl, 0.0


class GCRA(Strategy):
    """Generic Cell Rate Algorithm: a theoretical arrival time (TAT) per rate."""

    name = "gcra"
    slots = 1

    def decide_rate(
        self, state: Sequence[float] | None, now: float, rate: Rate, cost: int
    ) -> Answer[int]:
        tat = state[0] if state else now
        if not tat > now:  # a TAT in the past is no debt
            tat = now
        new_tat = tat + cost * rate.interval
        allow_at = new_tat - rate.period
        if allow_at > now + EPSILON:  # denied: nothing consumed, the rate shows its TAT
            stored, wait = None, math.inf if cost > rate.amount else allow_at - now
        else:  # admitted: the rate shows its new TAT
            stored, wait, tat = [new_tat], 0.0, new_tat
        reset_after = tat - now
        remaining = math.floor((rate.period - reset_after) / rate.interval + EPSILON)
        return stored, remaining if remaining > 0 else 0, reset_after, wait

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

    def decide_rate(
        self, state: Sequence[float] | None, now: float, rate: Rate, cost: int
    ) -> Answer[int]:
        amount, period = rate.amount, rate.period
        window = math.floor(now / period)
        count = state[1] if state and state[0] == window else 0.0
        reset_after = (window + 1) * period - now
        if count + cost > amount:  # denied: nothing consumed
            stored, wait, used = None, math.inf if cost > amount else reset_after, 0
        else:
            stored, wait, used = [window, count + cost], 0.0, cost
        # Below 0 when counted under a higher limit than this one.
        return stored, int(amount - count - used), reset_after, wait

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

    def decide_rate(
        self, state: Sequence[float] | None, now: float, rate: Rate, cost: int
    ) -> Answer[int]:
        amount, period = rate.amount, rate.period
        window = math.floor(now / period)
        elapsed = now - window * period
        previous = current = 0.0
        if state:
            if state[0] == window:
                previous, current = state[1], state[2]
            elif state[0] == window - 1:
                previous = state[2]
        estimate = previous * (1 - elapsed / period) + current
        if estimate + cost > amount + EPSILON:  # denied: nothing consumed
            stored, wait, used = None, _sliding_wait(rate, elapsed, previous, current, cost), 0
        else:
            stored, wait, used = [window, previous, current + cost], 0.0, cost
        # Fully reset once what is counted has slid out: this window's count, the previous one's.
        counted = current + used
        reset_after = 2 * period - elapsed if counted else (period - elapsed if previous else 0.0)
        return stored, _count(amount - estimate - used, 1), reset_after, wait

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
local function reset_for(period, elapsed, previous, current)
  if current > 0 then return 2 * period - elapsed end
  if previous > 0 then return period - elapsed end
  return 0
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
  before[i] = {math.max(0, math.floor(amount - estimate + eps)),
    reset_for(period, elapsed, previous, current)}
  after[i] = {math.max(0, math.floor(amount - estimate - cost + eps)),
    reset_for(period, elapsed, previous, current + cost)}
  new_state[3 * i - 2] = string.format('%.17g', window)
  new_state[3 * i - 1] = string.format('%.17g', previous)
  new_state[3 * i] = string.format('%.17g', current + cost)
  if after[i][2] > ttl then ttl = after[i][2] end
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
