from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_resilience import StartupError, resilient
from asgi_resilience.config import (
    ENV_PREFIX,
    PARSERS,
    ConfigurationError,
    options_from_env,
    variable_for,
)
from tests.asgi import client_for

pytestmark = pytest.mark.anyio


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


def app() -> Starlette:
    return Starlette(routes=[Route("/hello", hello)])


def env(**values: str) -> dict[str, str]:
    return {variable_for(name): value for name, value in values.items()}


@pytest.mark.parametrize(
    ("option", "value", "parsed"),
    [
        ("debug", "true", True),
        ("debug", "Off", False),
        ("debug", "auto", None),
        ("envelope", "1", True),
        ("request_id_header", " X-Correlation-ID ", "X-Correlation-ID"),
        ("access_log_exclude_paths", "/health, /internal", ("/health", "/internal")),
        ("slow_threshold", "0.25", 0.25),
        ("health_path", "/status", "/status"),
        ("health_path", "none", None),
        ("health_cache_ttl", "0", 0.0),
        ("version", " 1.4.2 ", "1.4.2"),
        ("rate_limit", "10/second;1000/hour", "10/second;1000/hour"),
        ("rate_limit", "off", None),
        ("rate_limit_backend", "redis://cache:6379/0", "redis://cache:6379/0"),
        ("rate_limit_strategy", "sliding-window", "sliding-window"),
        ("rate_limit_key", "header:X-API-Key", "header:X-API-Key"),
        ("rate_limit_on_backend_error", "deny", "deny"),
        ("rate_limit_backend_timeout", "0.1", 0.1),
        ("trusted_proxies", "10.0.0.0/8, ::1", ("10.0.0.0/8", "::1")),
        ("forwarded_header", "forwarded", "forwarded"),
        ("health_cache_ttl", "0.00", 0.0),
        ("metrics_path", "/internal/metrics", "/internal/metrics"),
        ("tracing", "no", False),
    ],
)
def test_each_variable_is_parsed(option: str, value: str, parsed: Any) -> None:
    assert options_from_env(env(**{option: value})) == {option: parsed}


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("rate_limit", "ten", "expected '<count>/<unit>'"),
        ("rate_limit", "5/fortnight", "expected '<count>/<unit>'"),
        ("envelope", "maybe", "expected true or false"),
        ("slow_threshold", "fast", "number of seconds"),
        ("slow_threshold", "-1", "positive"),
        ("slow_threshold", "nan", "positive"),
        ("health_path", "health", "starting with '/'"),
        ("metrics_path", "/metrics/", "not ending"),
        ("rate_limit_backend", "memcached://x", "redis://"),
        ("rate_limit_strategy", "leaky-bucket", "one of gcra"),
        ("rate_limit_key", "cookie:session", "ip or header"),
        ("rate_limit_key", "user", "ip or header"),
        ("forwarded_header", "x-real-ip", "one of x-forwarded-for"),
        ("trusted_proxies", "10.0.0.0/8,proxy.local", "proxy.local"),
        ("request_id_header", "X Request", "header name"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_value(option: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        options_from_env(env(**{option: value}))
    message = str(raised.value)
    assert message.startswith(f"{variable_for(option)}={value!r}: ")
    assert reason in message
    assert isinstance(raised.value, ValueError)


def test_an_unknown_variable_is_an_error_not_ignored() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting ASGI_RESILIENCE_RATELIMIT"):
        options_from_env({"ASGI_RESILIENCE_RATELIMIT": "5/second"})


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("ASGI_RESILIENCE_RATELIMIT", "ASGI_RESILIENCE_RATE_LIMIT"),
        ("ASGI_RESILIENCE_MAX_CONCURENCY", "ASGI_RESILIENCE_MAX_CONCURRENCY"),
        ("ASGI_RESILIENCE_TRUSTED_PROXY", "ASGI_RESILIENCE_TRUSTED_PROXIES"),
        ("ASGI_RESILIENCE_ENVELOPES", "ASGI_RESILIENCE_ENVELOPE"),
    ],
)
def test_a_misspelt_variable_gets_did_you_mean(variable: str, meant: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{variable}: did you mean {meant}\\?$"):
        options_from_env({variable: "1"})


def test_a_variable_like_none_lists_them_all() -> None:
    with pytest.raises(ConfigurationError, match="the variables are ASGI_RESILIENCE_DEBUG, ") as e:
        options_from_env({"ASGI_RESILIENCE_FROBNICATE": "1"})
    assert "did you mean" not in str(e.value) and "ASGI_RESILIENCE_MAX_LAG" in str(e.value)


def test_other_variables_are_ignored() -> None:
    assert options_from_env({"PATH": "/bin", "RATE_LIMIT": "ten"}) == {}


def test_every_option_has_one_documented_variable() -> None:
    assert all(variable_for(option).startswith(ENV_PREFIX) for option in PARSERS)
    import asgi_resilience.stack as stack

    documented = stack.resilient.__doc__ or ""
    for option in PARSERS:
        assert f"{option}:" in documented, option


async def test_resilient_reads_the_environment() -> None:
    environ = env(envelope="true", rate_limit="2/minute", request_id_header="X-Trace")
    wrapped = resilient(app(), environ=environ, registry=CollectorRegistry())
    async with client_for(wrapped) as client:
        responses = [await client.get("/hello") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0].json()["data"] == {"hello": "world"}
    assert responses[0].headers["x-ratelimit-limit"] == "2"
    assert "x-trace" in responses[0].headers


async def test_keyword_arguments_win_over_the_environment() -> None:
    environ = env(envelope="true", rate_limit="1/minute")
    wrapped = resilient(
        app(), environ=environ, envelope=False, rate_limit=None, registry=CollectorRegistry()
    )
    async with client_for(wrapped) as client:
        responses = [await client.get("/hello") for _ in range(3)]
    assert [r.json() for r in responses] == [{"hello": "world"}] * 3
    assert "x-ratelimit-limit" not in responses[0].headers


def test_a_user_key_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigurationError, match="before your app's authentication"):
        resilient(app(), environ={}, rate_limit="5/second", rate_limit_key="user")


def test_resilient_fails_at_once_on_a_bad_variable() -> None:
    with pytest.raises(ConfigurationError, match=r"ASGI_RESILIENCE_RATE_LIMIT='ten'"):
        resilient(app(), environ=env(rate_limit="ten"))


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASGI_RESILIENCE_SLOW_THRESHOLD", "soon")
    with pytest.raises(ConfigurationError, match="ASGI_RESILIENCE_SLOW_THRESHOLD='soon'"):
        resilient(app())


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's client is asyncio-only
async def test_an_unreachable_redis_url_fails_startup_clearly(closed_port: int) -> None:
    url = f"redis://127.0.0.1:{closed_port}/0"
    wrapped = resilient(
        app(),
        environ=env(rate_limit="5/second", rate_limit_backend=url),
        registry=CollectorRegistry(),
    )
    with pytest.raises(StartupError) as raised:
        async with LifespanManager(wrapped):
            pass  # pragma: no cover - startup must fail
    message = str(raised.value)
    assert "check 'rate-limit-backend' failed" in message
    assert "Redis is not reachable" in message


# --- resilient()'s options, declared once ---------------------------------------------------

# A wrong value for every option of resilient(): each must be refused, naming the option.
WRONG = {
    "debug": "yes",
    "envelope": 1,
    "request_ids": "true",
    "request_id_header": "X Request Id",
    "trust_incoming_request_id": None,
    "access_log": 0,
    "access_logger": "asgi_resilience.access",
    "access_log_sink": object(),
    "access_log_exclude_paths": "/health",
    "slow_threshold": "1s",
    "errors": "no",
    "on_error": "sentry",
    "cors": ["https://a.example"],
    "envelope_exclude_paths": ["health"],
    "lifespan": object(),
    "health_path": "health",
    "health_status_details": "on",
    "health_cache_ttl": -1,
    "version": 2,
    "rate_limit": "a hundred a minute",
    "rate_limit_backend": "postgres://db",
    "rate_limit_strategy": "leaky-bucket",
    "rate_limit_key": "cookie",
    "rate_limit_routes": ["/a"],
    "rate_limit_exempt_paths": 5,
    "rate_limit_on_backend_error": "retry",
    "rate_limit_backend_timeout": 0,
    "trusted_proxies": "10.0.0.0/8",
    "forwarded_header": "x-real-ip",
    "operational_allow": "10.0.0.0/8",
    "management_port": "9090",
    "management_host": "",
    "metrics": "1",
    "metrics_path": "metrics",
    "registry": {},
    "tracing": [],
    "tracer_provider": "otel",
    "max_concurrency": 0,
    "max_queue": -1,
    "queue_timeout": float("inf"),
    "max_lag": "0.1",
    "timeout": True,
    "timeout_routes": "/slow",
    "max_body_size": 1.5,
    "body_limit_routes": 10,
}


def test_resilient_lists_the_options_in_their_declared_order() -> None:
    import inspect

    from asgi_resilience import resilient
    from asgi_resilience.config import Options

    parameters = list(inspect.signature(resilient).parameters)
    declared = [option.name for option in dataclasses.fields(Options)]
    assert parameters == ["app", *declared, "environ"]
    assert set(WRONG) == set(declared)  # the table below covers every option
    assert set(PARSERS) <= set(declared)


@pytest.mark.parametrize("option", list(WRONG))
def test_every_option_refuses_a_wrong_value_naming_it(option: str) -> None:
    from asgi_resilience import resilient

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    extra: dict[str, Any] = {"rate_limit": "5/second"} if option.startswith("rate_limit_") else {}
    if option in ("max_queue", "max_lag", "queue_timeout"):
        extra = {"max_concurrency": 4}
    with pytest.raises(ValueError, match=rf"^{option}\b") as raised:
        wrong: dict[str, Any] = {option: WRONG[option]}
        resilient(app, environ={}, **extra, **wrong)
    assert "got " in str(raised.value) or repr(WRONG[option]) in str(raised.value)


def test_iterable_options_are_kept_as_tuples_and_generators_are_read_once() -> None:
    from asgi_resilience.config import Options

    options = Options(trusted_proxies=(p for p in ["10.0.0.0/8"]), envelope_exclude_paths=["/a"])  # type: ignore[arg-type]
    assert options.trusted_proxies == ("10.0.0.0/8",)
    assert options.envelope_exclude_paths == ("/a",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.envelope = True  # type: ignore[misc]


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "redis://127.0.0.1:6379/0",
        "rediss://cache:6380/1",
        "unix:///run/redis.sock",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
        "redis+sentinel://127.0.0.1:26379/mymaster",
    ],
)
def test_every_backend_url_the_backends_open_is_accepted_by_keyword_and_variable(url: str) -> None:
    from asgi_resilience import resilient
    from asgi_resilience.ratelimit.backends import BACKEND_SCHEMES

    assert url.partition("://")[0] in BACKEND_SCHEMES
    assert options_from_env(env(rate_limit_backend=url)) == {"rate_limit_backend": url}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    resilient(app, environ={}, rate_limit="5/second", rate_limit_backend=url)  # no connection yet


def test_timeout_off_from_the_environment_and_options_that_need_max_concurrency() -> None:
    from asgi_resilience import resilient

    assert options_from_env(env(timeout="off")) == {"timeout": None}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    for given in ({"queue_timeout": 0.5}, {"max_lag": 0.05}):
        with pytest.raises(ConfigurationError, match="does nothing without max_concurrency"):
            resilient(app, environ={}, **given)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="queue_timeout does nothing"):
        resilient(app, environ=env(queue_timeout="0.5"))
    resilient(app, environ={}, max_concurrency=4, queue_timeout=0.5)  # with it: fine
