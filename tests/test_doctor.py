"""``asgi_resilience.doctor.diagnose``: one app built to trigger each finding, and a clean app
that gets only "ok"."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from asgi_resilience import Lifespan, resilient
from asgi_resilience.doctor import Finding, diagnose
from asgi_resilience.ratelimit import MemoryBackend
from asgi_resilience.stack import ResilientApp

CHECKS = [
    "debug",
    "rate-limit-backend",
    "trusted-proxies",
    "operational-endpoints",
    "shutdown-time",
    "startup-checks",
    "multiprocess-metrics",
    "health-details",
]


async def ping() -> None:
    pass


def clean_lifespan(**options: Any) -> Lifespan:
    lifespan = Lifespan(**options)
    lifespan.add_check("database", ping)
    return lifespan


def clean(**overrides: Any) -> ResilientApp:
    """A production-ready configuration: only "ok" findings."""
    options: dict[str, Any] = {
        "debug": False,
        "rate_limit": "100/minute",
        "rate_limit_backend": "redis://127.0.0.1:6379/0",
        "trusted_proxies": ["10.0.0.0/8"],
        "operational_allow": ["10.0.0.0/8"],
        "lifespan": clean_lifespan(drain_delay=5, shutdown_timeout=20),
        "registry": CollectorRegistry(),
        **overrides,
    }
    return resilient(Starlette(), environ={}, **options)


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.check: finding for finding in findings}


def test_a_clean_app_gets_only_ok_lines() -> None:
    findings = diagnose(clean(), workers=4, grace_period=30, environ={}, run_by_cli=True)
    assert [finding.check for finding in findings] == CHECKS
    assert {finding.severity for finding in findings} == {"ok"}
    assert all(finding.fix == "" for finding in findings)


@pytest.mark.parametrize(
    ("check", "severity", "overrides", "context", "says", "fix"),
    [
        ("debug", "error", {"debug": True}, {}, "debug is on outside development", "debug=False"),
        (
            "debug",
            "warning",
            {"debug": True},
            {"environ": {"APP_ENV": "development"}},
            "APP_ENV/ENVIRONMENT says development",
            "APP_ENV=production",
        ),
        (
            "rate-limit-backend",
            "error",
            {"rate_limit_backend": "memory://"},
            {"workers": 4},
            "each worker limits alone, so the service admits up to 4 times '100/minute'",
            "rate_limit_backend='redis://",
        ),
        (
            "rate-limit-backend",
            "error",
            {"rate_limit_backend": MemoryBackend()},
            {"workers": 2},
            "under 2 workers",
            "redis://",
        ),
        (
            "rate-limit-backend",
            "warning",
            {"rate_limit_backend": "memory://"},
            {"workers": 1},
            "every replica of the service limits alone",
            "more than one replica",
        ),
        (
            "trusted-proxies",
            "warning",
            {"trusted_proxies": ()},
            {},
            "the first busy client gets everyone rate limited (429)",
            "trusted_proxies=['10.0.0.0/8']",
        ),
        (
            "operational-endpoints",
            "warning",
            {"operational_allow": None},
            {},
            "/metrics answer anyone on the application's port",
            "management_port=9090",
        ),
        (
            "shutdown-time",
            "error",
            {"lifespan": clean_lifespan(drain_delay=10, shutdown_timeout=25)},
            {"grace_period": 30},
            "drain_delay 10 s + shutdown_timeout 25 s = 35 s, longer than the 30 s grace period",
            "terminationGracePeriodSeconds >= 40",
        ),
        (
            "startup-checks",
            "warning",
            # no rate limit either: a Redis backend would bring its own startup check
            {"lifespan": Lifespan(), "rate_limit": None, "rate_limit_backend": "memory://"},
            {},
            "no startup checks",
            "lifespan.add_check('database', ping)",
        ),
        (
            "multiprocess-metrics",
            "error",
            {},
            {"workers": 3, "run_by_cli": False},
            "3 workers without PROMETHEUS_MULTIPROC_DIR",
            "asgi-resilience run --workers N",
        ),
        (
            "health-details",
            "warning",
            {"health_status_details": True, "operational_allow": None},
            {},
            "/health/status shows versions, checks, tasks and process facts to anyone",
            "operational_allow=['10.0.0.0/8']",
        ),
    ],
    ids=[
        "debug-in-production",
        "debug-in-development",
        "memory-rate-limit-workers",
        "memory-backend-object-workers",
        "memory-rate-limit-replicas",
        "no-trusted-proxies",
        "public-operational-endpoints",
        "shutdown-longer-than-grace",
        "no-startup-checks",
        "workers-without-multiprocess-dir",
        "public-health-details",
    ],
)
def test_each_mistake_is_found_with_its_fix(
    check: str,
    severity: str,
    overrides: dict[str, Any],
    context: dict[str, Any],
    says: str,
    fix: str,
) -> None:
    arguments: dict[str, Any] = {"environ": {}, "run_by_cli": True, **context}
    findings = by_check(diagnose(clean(**overrides), **arguments))
    found = findings.pop(check)
    assert found.severity == severity
    assert says in found.message
    assert fix in found.fix
    assert fix in found.line() and found.line().startswith(f"{severity:<8} {check}")
    others = {name: f.severity for name, f in findings.items() if f.severity != "ok"}
    # the app was built to trigger this finding alone; public status details are also a
    # public operational endpoint
    expected = {"operational-endpoints": "warning"} if check == "health-details" else {}
    assert others == expected, others


def test_multiprocess_is_fine_when_the_directory_is_set_or_metrics_are_off() -> None:
    with_dir = diagnose(clean(), workers=2, environ={"PROMETHEUS_MULTIPROC_DIR": "/tmp/m"})
    assert by_check(with_dir)["multiprocess-metrics"].severity == "ok"
    no_metrics = diagnose(clean(metrics=False), workers=2, environ={})
    assert by_check(no_metrics)["multiprocess-metrics"].severity == "ok"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"workers": 0}, "workers must be a whole number >= 1"),
        ({"workers": True}, "workers must be a whole number >= 1"),
        ({"grace_period": 0}, "grace_period must be > 0"),
        ({"grace_period": "30"}, "grace_period must be a number of seconds"),
    ],
)
def test_wrong_arguments_are_refused(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        diagnose(clean(), **arguments)


def test_an_app_that_is_not_a_resilient_app_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not a resilient\(\) app"):
        diagnose(Starlette())


def test_a_lifespan_given_to_the_framework_is_inspected_too() -> None:
    lifespan = Lifespan(drain_delay=20, shutdown_timeout=25)
    lifespan.add_check("database", ping)
    app = resilient(
        Starlette(lifespan=lifespan),
        environ={},
        registry=CollectorRegistry(),
        debug=False,
        trusted_proxies=["10.0.0.0/8"],
        operational_allow=["10.0.0.0/8"],
    )
    findings = by_check(diagnose(app, grace_period=30, environ={}))
    assert findings["startup-checks"].severity == "ok"
    assert "database" in findings["startup-checks"].message
    shutdown = findings["shutdown-time"]
    assert shutdown.severity == "error"
    # the stack's own (a bare one: 25 s) and the framework's (45 s), one after the other
    assert "drain_delay 20 s + shutdown_timeout 50 s = 70 s" in shutdown.message


def test_an_empty_allow_list_keeps_everything_private() -> None:
    app = clean(operational_allow=[], health_status_details=True)
    findings = by_check(diagnose(app, environ={}, run_by_cli=True))
    assert findings["operational-endpoints"].severity == "ok"
    assert findings["health-details"].severity == "ok"
