"""Request-path metrics updated without a lock: histograms, a gauge and counters.

prometheus_client guards every value with a lock, for threaded servers: one histogram
observation takes two of them (bucket and sum) inside three Python calls, about 1 us, and each
request makes five such updates. Here an update is a few bytecodes with no call between reading
a value and writing it back, which the GIL never interrupts (it hands over only at calls and
loop edges), so concurrent updates from several threads still add up. ``Metrics`` uses these
only where that holds and where prometheus_client's own storage is not needed: in a single
process (multiprocess mode keeps its values in prometheus_client's files) with the GIL enabled;
otherwise it uses prometheus_client's classes, whose interface these follow as far as the
stack needs it (``labels()``, ``remove()``, ``clear()``; ``observe()``, ``inc()``, ``dec()``,
``set()``). Each is a collector: the registry renders it with
prometheus_client's exposition, text format and OpenMetrics alike (exemplars included). No
``_created`` series are written, as in prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from time import time
from typing import ClassVar, Generic, TypeVar

from prometheus_client import CollectorRegistry, values
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

__all__ = ["Counter", "Gauge", "Histogram", "lock_free"]


def lock_free() -> bool:
    """Can request metrics use these series? One process (prometheus_client chose its
    in-memory values, not multiprocess files) and a GIL (not a free-threaded build)."""
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    return bool(gil) and values.ValueClass is values.MutexValue


ChildT = TypeVar("ChildT")


class _Collector(Generic[ChildT]):
    """A metric with labels: one child per label values, made on first use."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], ChildT] = {}
        registry.register(self)  # type: ignore[arg-type]

    def labels(self, *label_values: object, **by_name: object) -> ChildT:
        """The child for these label values, given in order or by name (strings, or anything
        ``str()`` makes one), as prometheus_client's ``labels()``."""
        key = self._key(label_values, by_name)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, self._new_child())
        return child

    def remove(self, *label_values: object) -> None:
        """Forget the child of these label values (its series leaves the exposition)."""
        self._children.pop(self._key(label_values, {}), None)

    def clear(self) -> None:
        """Forget every child."""
        self._children.clear()

    def _key(self, label_values: tuple[object, ...], by_name: dict[str, object]) -> tuple[str, ...]:
        if by_name:
            if label_values or set(by_name) != set(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {by_name}")
            label_values = tuple(by_name[name] for name in self.labelnames)
        if len(label_values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {label_values}")
        return tuple(str(value) for value in label_values)

    def _new_child(self) -> ChildT:
        raise NotImplementedError  # pragma: no cover - every subclass implements it

    def _family(self) -> Metric:
        raise NotImplementedError  # pragma: no cover - every subclass implements it

    def describe(self) -> list[Metric]:
        """The metric, without samples: what the registry checks names against."""
        return [self._family()]

    def _items(self) -> Iterable[tuple[tuple[str, ...], ChildT]]:
        # A copy made in one step: requests (other threads) may add children meanwhile.
        return self._children.copy().items()


class HistogramChild:
    """One label set of a ``Histogram``: a count per bucket, the sum, an exemplar per bucket."""

    __slots__ = ("bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.exemplars: list[Exemplar | None] = [None] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        self.sum += amount
        if amount == amount:  # NaN is in no bucket (so not counted), as in prometheus_client
            index = bisect_left(self.bounds, amount)  # the first bucket with amount <= le
            self.counts[index] += 1
            if exemplar is not None:
                self.exemplars[index] = Exemplar(exemplar, amount, time())


class Histogram(_Collector[HistogramChild]):
    """A histogram: ``labels(*values).observe(amount, exemplar)``, as prometheus_client's."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(bound) for bound in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._bucket_names = tuple(
            floatToGoString(bound)  # type: ignore[no-untyped-call]
            for bound in self.bounds
        )
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for key, child in self._items():
            cumulative = 0
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            counts = list(child.counts)
            for name, count, exemplar in zip(
                self._bucket_names, counts, child.exemplars, strict=True
            ):
                cumulative += count
                buckets.append((name, cumulative, exemplar) if exemplar else (name, cumulative))
            family.add_metric(key, buckets, child.sum)
        yield family


class _Value:
    """One label set of a counter or a gauge: a number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class CounterChild(_Value):
    """One label set of a ``Counter``."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class GaugeChild(_Value):
    """One label set of a ``Gauge``."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


ValueT = TypeVar("ValueT", bound=_Value)


class _ValueCollector(_Collector[ValueT]):
    """A counter or a gauge: one number per label set."""

    family_type: ClassVar[type[CounterMetricFamily] | type[GaugeMetricFamily]]

    def _family(self) -> Metric:
        return self.family_type(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for key, child in self._items():
            family.add_metric(key, child.value)  # type: ignore[attr-defined]
        yield family


class Counter(_ValueCollector[CounterChild]):
    """A counter: ``labels(*values).inc()``. Named without ``_total``; its sample has it."""

    family_type = CounterMetricFamily

    def _new_child(self) -> CounterChild:
        return CounterChild()


class Gauge(_ValueCollector[GaugeChild]):
    """A gauge: ``labels(*values).inc()`` and ``.dec()``."""

    family_type = GaugeMetricFamily

    def _new_child(self) -> GaugeChild:
        return GaugeChild()
