"""``asgi-resilience``: run a service with the stack, check its dependencies, or try the demo.

    asgi-resilience run module:app [--host 127.0.0.1] [--port 8000] [--workers 1]
                                   [--env-file .env] [--log-level info] [--plain-logs]
    asgi-resilience check module:app [--env-file .env]
    asgi-resilience worker module:lifespan [--host 127.0.0.1] [--port 8000] [--env-file .env]
    asgi-resilience drain [--url http://127.0.0.1:8000] [--timeout 60]
    asgi-resilience demo [--host 127.0.0.1] [--port 8000]

``run`` wraps the app with ``resilient()`` (not twice: an app that already is one is served as
it is), configured from ``ASGI_RESILIENCE_*`` variables, and serves it with uvicorn: JSON log
lines on stdout, SIGTERM draining, exit code 0 after a graceful stop. With ``--workers`` above 1
it runs uvicorn's worker processes with Prometheus multiprocess mode in a directory of its own,
removed at the end. ``check`` runs the startup (resources and checks) once, prints a table and
exits 0 when startup succeeds, 1 when it fails. ``worker`` serves a ``Lifespan`` without an
HTTP app (a queue consumer, a scheduler): its health endpoints and ``/metrics`` on the port, its
checks, resources and background tasks; 0 after a graceful stop, 3 when startup failed (as
uvicorn exits for ``run``). ``drain`` (a Kubernetes ``preStop`` hook) asks the service at
``--url`` to drain (``POST <health path>/drain``, loopback only) and returns once its drain delay
has passed: 0, or 1 with the reason on stderr. Bad arguments exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from .access_log import JsonFormatter, JsonLinesSink
from .config import ConfigurationError
from .exceptions import UsageError as UsageError
from .lifespan import Lifespan, StartupError
from .request_id import RequestIdLogFilter
from .stack import ResilientApp, resilient
from .types import ASGIApp

__all__ = ["main"]

_TARGET_VARIABLE = "_ASGI_RESILIENCE_CLI_TARGET"  # how worker processes learn the app to serve
_PLAIN_VARIABLE = "_ASGI_RESILIENCE_CLI_PLAIN_LOGS"
_LEVEL_VARIABLE = "_ASGI_RESILIENCE_CLI_LOG_LEVEL"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asgi-resilience`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.env_file is not None:
            load_env_file(args.env_file)
        if args.command == "run":
            return run(
                args.target,
                args.host,
                args.port,
                args.workers,
                args.log_level,
                args.plain_logs,
                uds=args.uds,
                server=args.server,
            )
        if args.command == "check":
            return check(args.target)
        if args.command == "drain":
            return drain(args.url, args.timeout)
        if args.command == "worker":
            return worker(args.target, args.host, args.port, args.log_level, args.plain_logs)
        return demo(args.host, args.port, args.log_level)
    except (UsageError, ConfigurationError) as exc:
        print(f"asgi-resilience: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asgi-resilience", description="Run an ASGI service with asgi_resilience."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="serve module:app wrapped with resilient()")
    check_parser = commands.add_parser("check", help="run the startup checks of module:app")
    demo_parser = commands.add_parser("demo", help="serve the bundled demo service")
    worker_parser = commands.add_parser(
        "worker", help="run module:lifespan's checks, resources and tasks without an HTTP app"
    )
    drain_parser = commands.add_parser(
        "drain", help="drain a running service now (a preStop hook): readiness 503, then wait"
    )
    drain_parser.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="the service, on a loopback address (default: %(default)s); the health path is "
        "ASGI_RESILIENCE_HEALTH_PATH's, /health unless set",
    )
    drain_parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the drain delay to pass (default: %(default)s)",
    )
    for sub in (run_parser, check_parser):
        sub.add_argument("target", help="the app to load, as module:attribute")
    worker_parser.add_argument("target", help="the Lifespan to run, as module:attribute")
    for sub in (run_parser, demo_parser, worker_parser):
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=8000)
        sub.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    run_parser.add_argument("--workers", type=int, default=1)
    run_parser.add_argument(
        "--server",
        choices=("uvicorn", "hypercorn", "granian"),
        default="uvicorn",
        help="the ASGI server (default: %(default)s); each drains on SIGTERM",
    )
    run_parser.add_argument(
        "--uds",
        metavar="PATH",
        help="listen on this unix socket instead of --host/--port (a proxy in front); its "
        "peers are then trusted proxies (ASGI_RESILIENCE_TRUSTED_PROXIES=unix unless set)",
    )
    for sub in (run_parser, worker_parser):
        sub.add_argument(
            "--plain-logs", action="store_true", help="human-readable log lines instead of JSON"
        )
    for sub in (run_parser, check_parser, demo_parser, worker_parser, drain_parser):
        sub.add_argument("--env-file", type=Path, help="KEY=VALUE lines to add to the environment")
    return parser


def load_env_file(path: Path) -> None:
    """Add ``KEY=VALUE`` lines to ``os.environ`` (variables already set win; ``#`` comments,
    blank lines, ``export`` and quotes allowed). Written here to keep the runtime dependencies
    at four; python-dotenv does more than this needs."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read --env-file {str(path)!r}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.removeprefix("export ").partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name.isidentifier():
            raise UsageError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        os.environ.setdefault(name, value)


def load_app(target: str) -> ASGIApp:
    """Import ``module:attribute`` and return the ASGI app it names."""
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"expected module:attribute, got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as uvicorn does: modules next to you are found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise UsageError(f"no module named {module_name!r}") from None
        raise
    app: Any = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(app):
        raise UsageError(f"{target} is not an ASGI app: a {type(app).__name__} is not callable")
    return app  # type: ignore[no-any-return]


def _wrapped(target: str, *, plain: bool = True) -> ResilientApp:
    """``target`` wrapped with ``resilient()``; with JSON logs, its access log goes through a
    ``JsonLinesSink`` on stdout: the same lines for less than ``logging`` costs."""
    app = load_app(target)
    if isinstance(app, ResilientApp):
        return app
    return resilient(app) if plain else resilient(app, access_log_sink=JsonLinesSink(sys.stdout))


def configure_logging(level: str = "info", *, plain: bool = False) -> None:
    """Root logging to stdout: JSON lines with request and trace ids, or plain lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(RequestIdLogFilter())
    if plain:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def worker_app() -> ResilientApp:
    """The app of one uvicorn worker process (``--workers`` above 1): uvicorn's factory."""
    from ._granian import install_drain_signal

    plain = os.environ.get(_PLAIN_VARIABLE) == "1"
    configure_logging(os.environ.get(_LEVEL_VARIABLE, "info"), plain=plain)
    app = _wrapped(os.environ[_TARGET_VARIABLE], plain=plain)
    install_drain_signal(app.lifespan)  # --server granian: the parent asks its workers to drain
    return app


def run(
    target: str,
    host: str,
    port: int,
    workers: int,
    log_level: str,
    plain: bool,
    uds: str | None = None,
    server: str = "uvicorn",
) -> int:
    """Serve ``target`` with uvicorn (or Hypercorn) until SIGTERM or SIGINT; 0 after a
    graceful stop.

    uvicorn's own forwarding-header handling (``proxy_headers``) is off: it would rewrite the
    client address from ``X-Forwarded-For`` sent by any local peer, and ``trusted_proxies`` is
    the one authority on it. With ``uds`` the service listens on a unix socket, whose peers
    (the proxy in front) are trusted unless ``ASGI_RESILIENCE_TRUSTED_PROXIES`` says otherwise.
    """
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if server == "hypercorn":
        return _run_hypercorn(target, host, port, workers, log_level, plain, uds)
    if server == "granian":
        return _run_granian(target, host, port, workers, log_level, plain, uds)
    uvicorn = _uvicorn()
    options: dict[str, Any] = {
        "log_config": None,
        "access_log": False,  # ours is better: one structured record per request
        "log_level": log_level,
        "proxy_headers": False,
    }
    _prepare_to_listen(host, port, uds, log_level, plain)
    if uds is None:
        options.update(host=host, port=port)
    else:
        options["uds"] = uds
    # uvicorn re-raises the SIGTERM it handled once it has stopped gracefully; a handler of
    # our own receives it, so the process can report a clean stop with exit code 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if workers == 1:
        uvicorn.run(_wrapped(target, plain=plain), **options)
        return 0
    _wrapped(target)  # fail here, once, rather than in every worker
    with _worker_environment(target, plain, log_level, multiprocess=True):
        uvicorn.run("asgi_resilience.cli:worker_app", factory=True, workers=workers, **options)
    return 0


def _prepare_to_listen(host: str, port: int, uds: str | None, log_level: str, plain: bool) -> None:
    """Refuse a port in use (one line, exit 2) or trust a unix socket's peers, then log."""
    if uds is None:
        _ensure_port_free(host, port)
    else:
        os.environ.setdefault("ASGI_RESILIENCE_TRUSTED_PROXIES", "unix")
    configure_logging(log_level, plain=plain)


@contextmanager
def _worker_environment(
    target: str, plain: bool, log_level: str, *, multiprocess: bool
) -> Iterator[None]:
    """What worker processes learn from the environment (``worker_app``); with
    ``multiprocess``, Prometheus multiprocess mode in a directory of its own, removed after."""
    metrics_dir = tempfile.mkdtemp(prefix="asgi-resilience-metrics-") if multiprocess else None
    if metrics_dir is not None:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
    os.environ[_TARGET_VARIABLE] = target
    os.environ[_PLAIN_VARIABLE] = "1" if plain else "0"
    os.environ[_LEVEL_VARIABLE] = log_level
    try:
        yield
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_hypercorn(
    target: str,
    host: str,
    port: int,
    workers: int,
    log_level: str,
    plain: bool,
    uds: str | None,
) -> int:
    """``run --server hypercorn``: see ``asgi_resilience._hypercorn``."""
    from ._hypercorn import serve_hypercorn, serve_hypercorn_workers

    _prepare_to_listen(host, port, uds, log_level, plain)
    if workers == 1:
        bind = f"unix:{uds}" if uds is not None else f"[{host}]:{port}" if ":" in host else None
        return serve_hypercorn(_wrapped(target, plain=plain), [bind or f"{host}:{port}"], log_level)
    _wrapped(target)  # fail here, once, rather than in every worker
    with _worker_environment(target, plain, log_level, multiprocess=True):
        return serve_hypercorn_workers(host, port, uds, workers)


def _run_granian(
    target: str,
    host: str,
    port: int,
    workers: int,
    log_level: str,
    plain: bool,
    uds: str | None,
) -> int:
    """``run --server granian``: see ``asgi_resilience._granian``."""
    from ._granian import serve_granian

    _prepare_to_listen(host, port, uds, log_level, plain)
    drain_delay = _wrapped(target).lifespan.drain_delay  # and fail here, not in every worker
    # Granian always serves from worker processes: one alone needs no multiprocess metrics.
    with _worker_environment(target, plain, log_level, multiprocess=workers > 1):
        return serve_granian(host, port, uds, workers, log_level, drain_delay)


def worker(target: str, host: str, port: int, log_level: str, plain: bool) -> int:
    """Serve the ``Lifespan`` ``target`` names as a worker; 0 after a graceful stop, 3 when
    its startup failed (the lifespan has logged why)."""
    from .worker import serve

    lifespan = load_app(target)
    if not isinstance(lifespan, Lifespan):
        raise UsageError(f"{target} is not a Lifespan: got a {type(lifespan).__name__}")
    _uvicorn()
    _ensure_port_free(host, port)
    configure_logging(log_level, plain=plain)
    try:
        serve(lifespan, host=host, port=port, log_level=log_level)
    except StartupError:
        return 3
    return 0


def drain(url: str, timeout: float) -> int:
    """``POST <url><health path>/drain``; 0 once the service's drain delay passed, else 1.

    urllib, not httpx: httpx is not a runtime dependency, and one POST needs nothing more."""
    import urllib.error
    import urllib.request

    health_path = os.environ.get("ASGI_RESILIENCE_HEALTH_PATH", "/health").rstrip("/")
    target = url.rstrip("/") + (health_path or "/health") + "/drain"
    if not target.startswith(("http://", "https://")):
        raise UsageError(f"--url must be an http:// or https:// URL, got {url!r}")
    if not timeout > 0:
        raise UsageError(f"--timeout must be a number of seconds above 0, got {timeout}")
    request = urllib.request.Request(target, method="POST", data=b"")
    # No proxy from http_proxy: through one the peer would not be loopback (404).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        print(f"asgi-resilience: drain: {target} answered {exc.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"asgi-resilience: drain: {target}: {exc}", file=sys.stderr)
        return 1
    print(f"drained: {body.get('status', '?')} after {body.get('drain_delay', '?')}s")
    return 0


def check(target: str) -> int:
    """Run ``target``'s startup once and print a table; 0 if it succeeded, 1 if not."""
    lifespan = _lifespan_of(load_app(target))
    # The table is the report: the lifespan's own log lines would only repeat it.
    lifespan.logger = logging.getLogger("asgi_resilience.cli.check")
    lifespan.logger.disabled = True
    try:
        asyncio.run(_startup_and_shutdown(lifespan))
        failed = False
    except StartupError as exc:
        failed = True
        reason = str(exc)
    rows = [
        (
            r.name,
            r.outcome + ("" if r.critical else " (non-critical)"),
            f"{r.duration * 1000:.0f} ms",
            r.error or "",
        )
        for r in lifespan.startup_results.values()
    ]
    _print_table(("check", "outcome", "duration", "error"), rows)
    if failed:
        print(reason)
        return 1
    print(f"startup ok: {len(rows)} check{'' if len(rows) == 1 else 's'}")
    return 0


async def _startup_and_shutdown(lifespan: Lifespan) -> None:
    await lifespan.trial_startup()  # a check starts no background task


def _lifespan_of(app: Any) -> Lifespan:
    if isinstance(app, ResilientApp):
        return app.lifespan
    context = getattr(getattr(app, "router", None), "lifespan_context", None)
    if isinstance(context, Lifespan):  # Starlette(lifespan=lifespan) / FastAPI(lifespan=...)
        return context
    return resilient(app).lifespan


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in (header, tuple("-" * width for width in widths), *rows):
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


def demo(host: str, port: int, log_level: str) -> int:
    """Serve the bundled demo (SQLite, memory rate limits) until stopped."""
    from . import demo as demo_module

    uvicorn = _uvicorn()
    _ensure_port_free(host, port)
    configure_logging(log_level)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(demo_module.create_app(), host=host, port=port, log_config=None, access_log=False)
    return 0


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serving needs uvicorn: pip install 'asgi-resilience[server]'") from None
    return uvicorn


def _ensure_port_free(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _main() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    _main()
