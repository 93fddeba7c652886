from __future__ import annotations

import re
import sys
import threading
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from asgi_resilience import series
from asgi_resilience.lifespan._core import LifespanCollectors
from asgi_resilience.metrics import DURATION_BUCKETS, Metrics
from asgi_resilience.ratelimit._collectors import RateLimitCollectors

OBSERVATIONS = [0.0, 0.005, 0.0051, 0.3, 1, 9.99, 10, 11, 1e9, float("inf")]


def without_created(text: bytes) -> list[str]:
    """Exposition lines minus ``_created`` series (which the lock-free series do not write)."""
    return [line for line in text.decode().splitlines() if "_created" not in line]


def both(kind: str, **options: object) -> tuple[CollectorRegistry, list[Any], CollectorRegistry]:
    """The same metric twice: prometheus_client's in one registry, ours in another."""
    theirs_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    args = ("demo_metric", "A metric.", ["method", "route"])
    theirs = getattr(prometheus_client, kind)(*args, registry=theirs_registry, **options)
    ours = getattr(series, kind)(*args, registry=ours_registry, **options)
    return theirs_registry, [theirs, ours], ours_registry


def test_histogram_exposition_matches_prometheus_client() -> None:
    theirs_registry, metrics, ours_registry = both("Histogram", buckets=DURATION_BUCKETS)
    for metric in metrics:
        for value in OBSERVATIONS:
            metric.labels("GET", "/items/{item_id}").observe(value)
        metric.labels(route="<unmatched>", method="POST").observe(0.02)  # by name
        metric.labels("PUT", "/nan").observe(float("nan"))  # in no bucket; the sum is NaN
    assert without_created(generate_latest(ours_registry)) == without_created(
        generate_latest(theirs_registry)
    )
    # A value equal to a bound lands in that bucket (le is inclusive), 1e9 and inf only in +Inf.
    assert (
        ours_registry.get_sample_value(
            "demo_metric_bucket", {"method": "GET", "route": "/items/{item_id}", "le": "0.005"}
        )
        == 2
    )
    assert (
        ours_registry.get_sample_value(
            "demo_metric_bucket", {"method": "GET", "route": "/items/{item_id}", "le": "10.0"}
        )
        == len(OBSERVATIONS) - 3  # all but 11, 1e9 and +inf
    )


def test_exemplars_in_openmetrics_match_prometheus_client() -> None:
    theirs_registry, metrics, ours_registry = both("Histogram", buckets=(0.1, 1))
    for metric in metrics:
        child = metric.labels("GET", "/")
        child.observe(0.05, {"trace_id": "0af7651916cd43dd8448eb211c80319c"})
        child.observe(0.5)

    def normalized(text: bytes) -> list[str]:  # exemplar timestamps differ by a few us
        return [re.sub(r"(# \{.*\} \S+) \S+$", r"\1 <t>", line) for line in without_created(text)]

    ours_text = generate_openmetrics(ours_registry)  # type: ignore[no-untyped-call]
    assert b'# {trace_id="0af7651916cd43dd8448eb211c80319c"} 0.05' in ours_text
    theirs_text = generate_openmetrics(theirs_registry)  # type: ignore[no-untyped-call]
    assert normalized(ours_text) == normalized(theirs_text)


@pytest.mark.parametrize("kind", ["Counter", "Gauge"])
def test_counter_and_gauge_exposition_match_prometheus_client(kind: str) -> None:
    theirs_registry, metrics, ours_registry = both(kind)
    for metric in metrics:
        metric.labels("GET", "/a").inc()
        metric.labels("GET", "/a").inc(2.5)
        metric.labels("HEAD", 7).inc()  # label values become str
    for metric in metrics:
        metric.labels("GONE", "/x").inc()
        metric.remove("GONE", "/x")
    if kind == "Gauge":
        for metric in metrics:
            metric.labels("GET", "/a").dec()
            metric.labels("SET", "/b").set(7)
    assert without_created(generate_latest(ours_registry)) == without_created(
        generate_latest(theirs_registry)
    )


def test_bad_use_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry()
    counter = series.Counter("things", "Things.", ["kind"], registry=registry)
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels(sort="a")
    counter.labels("a").inc()
    counter.clear()
    assert registry.get_sample_value("things_total", {"kind": "a"}) is None
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        series.Counter("things", "Again.", ["kind"], registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        prometheus_client.Counter("things", "Theirs.", registry=registry)


def test_concurrent_updates_from_threads_all_count() -> None:
    registry = CollectorRegistry()
    histogram = series.Histogram("latency", "L.", ["route"], buckets=(1,), registry=registry)
    counter = series.Counter("hits", "H.", ["route"], registry=registry)
    sys_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as the interpreter can
    try:

        def work() -> None:
            child, hits = histogram.labels("/"), counter.labels("/")
            for _ in range(20_000):
                child.observe(0.5)
                hits.inc()

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(sys_interval)
    assert registry.get_sample_value("latency_count", {"route": "/"}) == 80_000
    assert registry.get_sample_value("latency_sum", {"route": "/"}) == 40_000
    assert registry.get_sample_value("hits_total", {"route": "/"}) == 80_000


def test_request_metrics_use_prometheus_client_where_lock_free_cannot_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert series.lock_free()
    fast = Metrics(CollectorRegistry())
    assert isinstance(fast.request_duration, series.Histogram)
    assert isinstance(fast.feature(RateLimitCollectors).rate_limit_decisions, series.Counter)
    startup_checks = fast.feature(LifespanCollectors).startup_checks
    assert isinstance(startup_checks, prometheus_client.Histogram)  # not on the request path

    # Multiprocess mode: prometheus_client chose file-backed values at import (a value class
    # of its own; collectors without labels make their value at once, so it must work).
    class FileBackedValue(values.MutexValue):
        pass

    monkeypatch.setattr(values, "ValueClass", FileBackedValue)
    assert not series.lock_free()
    shared = Metrics(CollectorRegistry())
    assert isinstance(shared.request_duration, prometheus_client.Histogram)
    assert isinstance(shared.active_requests, prometheus_client.Gauge)
    assert shared.active_requests._multiprocess_mode == "livesum"
    assert isinstance(shared.exceptions, prometheus_client.Counter)
    monkeypatch.undo()

    # A free-threaded build: no GIL to make an update one step.
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    assert not series.lock_free()
    assert isinstance(Metrics(CollectorRegistry()).time_to_first_byte, prometheus_client.Histogram)
