"""``asgi-resilience``: run a service with the stack, check its dependencies, or try the demo.

    asgi-resilience run module:app [--factory] [--host 127.0.0.1] [--port 8000] [--uds PATH]
                                   [--workers 1] [--server uvicorn] [--root-path /api]
                                   [--log-level info] [--log-config PATH | --plain-logs]
                                   [--env-file .env]
    asgi-resilience check module:app [--factory] [--env-file .env]
    asgi-resilience worker module:lifespan [--factory] [--host 127.0.0.1] [--port 8000]
    asgi-resilience drain [--url http://127.0.0.1:8000] [--timeout 60]
    asgi-resilience doctor module:app [--factory] [--workers 1] [--grace-period 30]
                                      [--served-by other] [--env-file .env]
    asgi-resilience demo [--host 127.0.0.1] [--port 8000]
    asgi-resilience --version

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
has passed: 0, or 1 with the reason on stderr. ``doctor`` prints the production checklist's
findings for the app (``asgi_resilience.doctor``): exit 1 when one is an error. Bad arguments,
and a target that cannot be imported or is not an ASGI app, exit 2 with one line on stderr
(``asgi_resilience._target``).
``--log-config`` hands logging to the user's configuration (``asgi_resilience._logconfig``).
"""

from __future__ import annotations

import argparse
import asyncio
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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from ._logconfig import apply_log_config, quiet_startup_echo
from ._target import load_app as load_app
from ._target import load_target
from .access_log import JsonFormatter, JsonLinesSink
from .config import ConfigurationError
from .exceptions import MissingExtra
from .exceptions import UsageError as UsageError
from .lifespan import Lifespan, StartupError
from .request_id import RequestIdLogFilter
from .stack import ResilientApp, resilient

__all__ = ["main"]

_TARGET_VARIABLE = "_ASGI_RESILIENCE_CLI_TARGET"  # how worker processes learn the app to serve
_PLAIN_VARIABLE = "_ASGI_RESILIENCE_CLI_PLAIN_LOGS"
_LEVEL_VARIABLE = "_ASGI_RESILIENCE_CLI_LOG_LEVEL"
_FACTORY_VARIABLE = "_ASGI_RESILIENCE_CLI_FACTORY"
_LOG_CONFIG_VARIABLE = "_ASGI_RESILIENCE_CLI_LOG_CONFIG"
_ROOT_PATH_VARIABLE = "_ASGI_RESILIENCE_CLI_ROOT_PATH"  # Hypercorn's workers: their Config's
_LEVELS = ("debug", "info", "warning")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asgi-resilience`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.env_file is not None:
            load_env_file(args.env_file)
        if args.command == "run":
            return run(RunOptions.of(args))
        if args.command == "check":
            return check(args.target, factory=args.factory)
        if args.command == "drain":
            return drain(args.url, args.timeout)
        if args.command == "doctor":
            return doctor(
                args.target,
                factory=args.factory,
                workers=args.workers,
                grace_period=args.grace_period,
                served_by_run=args.served_by == "run",
            )
        if args.command == "worker":
            return worker(
                args.target,
                args.host,
                args.port,
                args.log_level,
                args.plain_logs,
                factory=args.factory,
            )
        return demo(args.host, args.port, args.log_level)
    except (UsageError, ConfigurationError, MissingExtra) as exc:
        print(f"asgi-resilience: error: {exc}", file=sys.stderr)
        return 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, as uvicorn's ``--help`` shows them: "none" for
    a setting that is absent unless given, "off" for a flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or not action.option_strings:
            return text
        if action.default is None:
            return f"{text} (default: none)"
        if action.default is False:
            return f"{text} (default: off)"
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="asgi-resilience",
        description="Run an ASGI service with asgi_resilience.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"asgi-resilience {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=summary, description=summary, formatter_class=_HelpFormatter
        )

    run_parser = command("run", "serve module:app wrapped with resilient()")
    check_parser = command("check", "run the startup checks of module:app once, print a table")
    worker_parser = command(
        "worker", "run module:lifespan's checks, resources and tasks without an HTTP app"
    )
    drain_parser = command(
        "drain", "drain a running service now (a preStop hook): readiness 503, then wait"
    )
    demo_parser = command("demo", "serve the bundled demo service")
    doctor_parser = command(
        "doctor", "check module:app's configuration for the mistakes that hurt in production"
    )
    for sub in (run_parser, check_parser, doctor_parser):
        sub.add_argument(
            "target", help="the ASGI app, as module:attribute (with --factory, what returns it)"
        )
        sub.add_argument(
            "--factory",
            action="store_true",
            help="the target is a function returning the app: called with no arguments, once in "
            "each worker process",
        )
    worker_parser.add_argument("target", help="the Lifespan to run, as module:attribute")
    worker_parser.add_argument(
        "--factory",
        action="store_true",
        help="the target is a function returning the Lifespan, called with no arguments",
    )
    for sub in (run_parser, worker_parser, demo_parser):
        sub.add_argument("--host", default="127.0.0.1", help="the address to listen on")
        sub.add_argument("--port", type=int, default=8000, help="the port to listen on")
    _add_run_options(run_parser)
    for sub in (worker_parser, demo_parser):
        sub.add_argument("--log-level", default="info", choices=_LEVELS, help="the log level")
    worker_parser.add_argument(
        "--plain-logs", action="store_true", help="human-readable log lines instead of JSON"
    )
    drain_parser.add_argument(
        "--url",
        help="the service, on a loopback address (default: http://127.0.0.1:8000, or the "
        "management port's when ASGI_RESILIENCE_MANAGEMENT_PORT is set: /health/drain is "
        "served there); the health path is ASGI_RESILIENCE_HEALTH_PATH's, /health unless set",
    )
    drain_parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the drain delay to pass"
    )
    _add_doctor_options(doctor_parser)
    for sub in (run_parser, check_parser, worker_parser, drain_parser, demo_parser, doctor_parser):
        sub.add_argument(
            "--env-file",
            type=Path,
            metavar="PATH",
            help="KEY=VALUE lines to add to the environment (variables already set win)",
        )
    return parser


def _add_doctor_options(doctor_parser: argparse.ArgumentParser) -> None:
    """``doctor``'s options: where the service will run."""
    doctor_parser.add_argument(
        "--workers", type=int, default=1, help="the worker processes it will run in"
    )
    doctor_parser.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the seconds between SIGTERM and SIGKILL where it runs (Kubernetes' "
        "terminationGracePeriodSeconds)",
    )
    doctor_parser.add_argument(
        "--served-by",
        choices=("run", "other"),
        default="other",
        help="run: served by asgi-resilience run (which sets up multiprocess metrics for "
        "several workers); other: by a server started otherwise",
    )


def _add_run_options(run_parser: argparse.ArgumentParser) -> None:
    """``run``'s own options: the ones a user of uvicorn's command expects, and the server."""
    run_parser.add_argument(
        "--uds",
        metavar="PATH",
        help="listen on this unix socket instead of --host/--port (a proxy in front); its "
        "peers are then trusted proxies (ASGI_RESILIENCE_TRUSTED_PROXIES=unix unless set)",
    )
    run_parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes; above 1, Prometheus multiprocess mode in a directory of its own",
    )
    run_parser.add_argument(
        "--server",
        choices=("uvicorn", "hypercorn", "granian"),
        default="uvicorn",
        help="the ASGI server; each drains on SIGTERM",
    )
    run_parser.add_argument(
        "--management-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /health/status and /health/drain on this port only "
        "(ASGI_RESILIENCE_MANAGEMENT_PORT; on ASGI_RESILIENCE_MANAGEMENT_HOST, 0.0.0.0 unless set)",
    )
    run_parser.add_argument(
        "--root-path",
        default="",
        metavar="PATH",
        help="the path prefix a proxy in front mounts the service under (/api): the ASGI "
        "root_path, handed to the server (default: none)",
    )
    run_parser.add_argument(
        "--log-level",
        choices=_LEVELS,
        help="the log level (default: info; with --log-config, the configuration's, and this "
        "sets only the server's own loggers, as uvicorn's --log-level does)",
    )
    logs = run_parser.add_mutually_exclusive_group()
    logs.add_argument(
        "--log-config",
        type=Path,
        metavar="PATH",
        help="a logging configuration, read as uvicorn's --log-config reads it: .json, .yaml or "
        ".yml (dictConfig), else INI (fileConfig); it replaces the JSON log lines and also "
        "carries the access log (logger asgi_resilience.access)",
    )
    logs.add_argument(
        "--plain-logs", action="store_true", help="human-readable log lines instead of JSON"
    )


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


def _wrapped(target: str, *, plain: bool = True, factory: bool = False) -> ResilientApp:
    """``target`` wrapped with ``resilient()``; unless ``plain`` (plain lines, or the user's
    ``--log-config``: through ``logging``), its access log goes through a ``JsonLinesSink`` on
    stdout: the same lines for less than ``logging`` costs."""
    app = load_app(target, factory=factory)
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


def _setup_logging(
    level: str, plain: bool, log_config: Path | None = None, *, warn: bool = False
) -> None:
    """This process's logging under ``run`` and ``worker``: ours (``configure_logging``), or
    the user's ``--log-config`` left as it is; either way the reason of a failed startup is
    logged once (see ``quiet_startup_echo``)."""
    if log_config is None:
        configure_logging(level, plain=plain)
    else:
        apply_log_config(log_config, warn=warn)
    quiet_startup_echo()


def worker_app() -> ResilientApp:
    """The app of one worker process (``--workers`` above 1, and every Granian worker):
    uvicorn's and Granian's factory. It sets up logging as the parent did, before the target
    is imported, then builds the app itself (calling the target with ``--factory``)."""
    from ._granian import install_drain_signal

    plain = os.environ.get(_PLAIN_VARIABLE) == "1"
    configured = os.environ.get(_LOG_CONFIG_VARIABLE)
    log_config = Path(configured) if configured else None
    _setup_logging(os.environ.get(_LEVEL_VARIABLE, "info"), plain, log_config)
    factory = os.environ.get(_FACTORY_VARIABLE) == "1"
    through_logging = plain or log_config is not None
    app = _wrapped(os.environ[_TARGET_VARIABLE], plain=through_logging, factory=factory)
    install_drain_signal(app.lifespan)  # --server granian: the parent asks its workers to drain
    return app


@dataclass(frozen=True)
class RunOptions:
    """What ``run`` serves and how, as the command line said it (the parser's names)."""

    target: str
    factory: bool
    host: str
    port: int
    uds: str | None
    workers: int
    server: str
    root_path: str
    management_port: int | None
    log_level: str | None
    log_config: Path | None
    plain_logs: bool

    @classmethod
    def of(cls, args: argparse.Namespace) -> RunOptions:
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    @property
    def level(self) -> str:
        return self.log_level or "info"

    @property
    def through_logging(self) -> bool:
        """The access log goes through ``logging`` (plain lines, the user's configuration)
        rather than straight to stdout as JSON lines."""
        return self.plain_logs or self.log_config is not None

    def app(self) -> ResilientApp:
        return self._checked(
            _wrapped(self.target, plain=self.through_logging, factory=self.factory)
        )

    def check_target(self) -> ResilientApp:
        """Fail here, once, rather than in every worker: the target, its stack's settings."""
        return self._checked(_wrapped(self.target, factory=self.factory))

    def _checked(self, app: ResilientApp) -> ResilientApp:
        """``--management-port`` reaches the stack through the environment: refuse an app
        built without it (``environ={}``, its own ``management_port=``) rather than leave its
        operational endpoints public while nothing listens on the port given."""
        wanted = self.management_port
        if wanted is not None and app.options.management_port != wanted:
            raise UsageError(
                f"--management-port {wanted}: {self.target} was built with management_port="
                f"{app.options.management_port!r} (resilient(environ=...) or its own keyword); "
                "let resilient() read ASGI_RESILIENCE_MANAGEMENT_PORT, or set it in the code"
            )
        return app


def run(options: RunOptions) -> int:
    """Serve ``options.target`` with uvicorn (or Hypercorn, Granian) until SIGTERM or SIGINT;
    0 after a graceful stop.

    uvicorn's own forwarding-header handling (``proxy_headers``) is off: it would rewrite the
    client address from ``X-Forwarded-For`` sent by any local peer, and ``trusted_proxies`` is
    the one authority on it. With ``uds`` the service listens on a unix socket, whose peers
    (the proxy in front) are trusted unless ``ASGI_RESILIENCE_TRUSTED_PROXIES`` says otherwise.
    """
    _check_options(options)
    if options.server == "hypercorn":
        return _run_hypercorn(options)
    if options.server == "granian":
        return _run_granian(options)
    uvicorn = _uvicorn()
    uvicorn_options: dict[str, Any] = {
        "log_config": None,  # set up by _prepare_to_listen (and worker_app), --log-config too
        "access_log": False,  # ours is better: one structured record per request
        # Under --log-config, uvicorn sets its loggers' level only when told to, as its own.
        "log_level": options.log_level if options.log_config else options.level,
        "proxy_headers": False,
        "root_path": options.root_path,
    }
    _prepare_to_listen(options)
    if options.uds is None:
        uvicorn_options.update(host=options.host, port=options.port)
    else:
        uvicorn_options["uds"] = options.uds
    # uvicorn re-raises the SIGTERM it handled once it has stopped gracefully; a handler of
    # our own receives it, so the process can report a clean stop with exit code 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if options.workers == 1:
        uvicorn.run(options.app(), **uvicorn_options)
        return 0
    options.check_target()
    with _worker_environment(options, multiprocess=True):
        app = "asgi_resilience.cli:worker_app"
        uvicorn.run(app, factory=True, workers=options.workers, **uvicorn_options)
    return 0


def _check_options(options: RunOptions) -> None:
    if options.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {options.workers}")
    port = options.management_port
    if port is not None:
        if not 0 < port < 65536:
            raise UsageError(f"--management-port must be between 1 and 65535, got {port}")
        if options.uds is None and port == options.port:
            raise UsageError(f"--management-port {port} is the application's --port: pick another")
        _ensure_port_free(os.environ.get("ASGI_RESILIENCE_MANAGEMENT_HOST", "0.0.0.0"), port)
        # resilient() reads it, in this process and in every worker.
        os.environ["ASGI_RESILIENCE_MANAGEMENT_PORT"] = str(port)
    root_path = options.root_path
    if root_path and (not root_path.startswith("/") or root_path.endswith("/")):
        raise UsageError(
            f"--root-path must start with / and not end with one (/api), got {root_path!r}"
        )


def _prepare_to_listen(options: RunOptions) -> None:
    """Refuse a port in use (one line, exit 2) or trust a unix socket's peers, empty the user's
    ``PROMETHEUS_MULTIPROC_DIR`` (whatever the workers: before the app is first imported, which
    may write files there), then log."""
    users_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if users_dir:
        _empty_metrics_directory(users_dir)
    if options.uds is None:
        _ensure_port_free(options.host, options.port)
    else:
        os.environ.setdefault("ASGI_RESILIENCE_TRUSTED_PROXIES", "unix")
    _setup_logging(options.level, options.plain_logs, options.log_config, warn=True)


@contextmanager
def _worker_environment(options: RunOptions, *, multiprocess: bool) -> Iterator[None]:
    """What worker processes learn from the environment (``worker_app``); with
    ``multiprocess``, Prometheus multiprocess mode in a directory of its own, removed after.
    A ``PROMETHEUS_MULTIPROC_DIR`` the user set is used instead, emptied first."""
    users_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if users_dir:
        _empty_metrics_directory(users_dir)
    own = multiprocess and not users_dir
    metrics_dir = tempfile.mkdtemp(prefix="asgi-resilience-metrics-") if own else None
    if metrics_dir is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    _set_worker_variables(options)
    try:
        yield
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _empty_metrics_directory(directory: str) -> None:
    """Remove the last run's files from the user's ``PROMETHEUS_MULTIPROC_DIR`` (created if
    missing) before any worker starts: prometheus_client would add them to this run's, so
    counters would carry on where the last run stopped. Only its own ``*.db`` files go."""
    from ._multiprocess import clear_directory

    try:
        clear_directory(directory)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(
            f"PROMETHEUS_MULTIPROC_DIR={directory} is not a writable directory: {reason}"
        ) from None


def _set_worker_variables(options: RunOptions) -> None:
    """What ``worker_app`` needs to build the app and log as this process does."""
    os.environ[_TARGET_VARIABLE] = options.target
    os.environ[_FACTORY_VARIABLE] = "1" if options.factory else "0"
    os.environ[_PLAIN_VARIABLE] = "1" if options.plain_logs else "0"
    os.environ[_LEVEL_VARIABLE] = options.level
    os.environ[_ROOT_PATH_VARIABLE] = options.root_path
    log_config = options.log_config
    os.environ[_LOG_CONFIG_VARIABLE] = str(log_config.resolve()) if log_config else ""


def _run_hypercorn(options: RunOptions) -> int:
    """``run --server hypercorn``: see ``asgi_resilience._hypercorn``."""
    from ._hypercorn import serve_hypercorn, serve_hypercorn_workers

    _prepare_to_listen(options)
    host, port, uds = options.host, options.port, options.uds
    if options.workers == 1:
        bind = f"unix:{uds}" if uds is not None else f"[{host}]:{port}" if ":" in host else None
        binds = [bind or f"{host}:{port}"]
        return serve_hypercorn(options.app(), binds, options.level, options.root_path)
    options.check_target()
    with _worker_environment(options, multiprocess=True):
        return serve_hypercorn_workers(host, port, uds, options.workers)


def _run_granian(options: RunOptions) -> int:
    """``run --server granian``: see ``asgi_resilience._granian``."""
    from ._granian import serve_granian

    _prepare_to_listen(options)
    # Built here to read its drain delay, and to fail here rather than in every worker.
    drain_delay = options.check_target().lifespan.drain_delay
    # Granian always serves from worker processes: one alone needs no multiprocess metrics.
    with _worker_environment(options, multiprocess=options.workers > 1):
        return serve_granian(
            options.host,
            options.port,
            options.uds,
            options.workers,
            options.level,
            drain_delay,
            root_path=options.root_path,
        )


def worker(
    target: str, host: str, port: int, log_level: str, plain: bool, *, factory: bool = False
) -> int:
    """Serve the ``Lifespan`` ``target`` names (with ``factory``: returns) as a worker; 0 after
    a graceful stop, 3 when its startup failed (the lifespan has logged why)."""
    from .worker import serve

    lifespan = load_target(target, factory=factory)
    if not isinstance(lifespan, Lifespan):
        subject = f"what {target} returned" if factory else target
        raise UsageError(f"{subject} is not a Lifespan: got a {type(lifespan).__name__}")
    _uvicorn()
    _ensure_port_free(host, port)
    _setup_logging(log_level, plain)
    try:
        serve(lifespan, host=host, port=port, log_level=log_level)
    except StartupError:
        return 3
    return 0


def drain(url: str | None, timeout: float) -> int:
    """``POST <url><health path>/drain``; 0 once the service's drain delay passed, else 1.

    urllib, not httpx: httpx is not a runtime dependency, and one POST needs nothing more."""
    import urllib.error
    import urllib.request

    if url is None:
        # A preStop hook runs in the service's container, with its environment.
        management = os.environ.get("ASGI_RESILIENCE_MANAGEMENT_PORT", "").strip()
        port = management if management.isdigit() else "8000"
        url = f"http://127.0.0.1:{port}"
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


def doctor(
    target: str, *, factory: bool, workers: int, grace_period: float, served_by_run: bool
) -> int:
    """Print ``target``'s findings (``asgi_resilience.doctor``), one line each; 1 when any is an
    error, else 0. The app is the one ``run`` would serve: wrapped with ``resilient()`` from
    the environment unless it already is."""
    from .doctor import diagnose

    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if not grace_period > 0:
        raise UsageError(f"--grace-period must be a number of seconds above 0, got {grace_period}")
    findings = diagnose(
        _wrapped(target, factory=factory),
        workers=workers,
        grace_period=grace_period,
        run_by_cli=served_by_run,
    )
    for finding in findings:
        print(finding.line())
    errors = sum(finding.severity == "error" for finding in findings)
    warnings = sum(finding.severity == "warning" for finding in findings)
    print(f"{_count(errors, 'error')}, {_count(warnings, 'warning')}")
    return 1 if errors else 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def check(target: str, *, factory: bool = False) -> int:
    """Run ``target``'s startup once and print a table; 0 if it succeeded, 1 if not."""
    # Every lifespan the service runs (the stack's, and one given to the framework), outer
    # first, as a real startup runs them: it stops at the first that fails.
    quiet = logging.getLogger("asgi_resilience.cli.check")
    quiet.disabled = True  # the table is the report: the lifespans' log lines would repeat it
    error: StartupError | None = None
    rows: list[tuple[str, ...]] = []
    for lifespan in _lifespans_of(load_app(target, factory=factory)):
        lifespan.logger = quiet
        try:
            asyncio.run(_startup_and_shutdown(lifespan))
        except StartupError as exc:
            error = exc
        rows += [
            (
                r.name,
                r.outcome + ("" if r.critical else " (non-critical)"),
                f"{r.duration * 1000:.0f} ms",
                r.error or "",
            )
            for r in lifespan.startup_results.values()
        ]
        if error is not None:
            break
    _print_table(("check", "outcome", "duration", "error"), rows)
    if error is not None:
        print(_failure_line(error, {row[0] for row in rows}))
        return 1
    print(f"startup ok: {_count(len(rows), 'check')}")
    return 0


def _failure_line(error: StartupError, in_table: set[str]) -> str:
    """The last line of a failed ``check``. The table gave each failed check's reason: name
    them only. A failure it cannot show (a resource, the startup's timeout) is said in full."""
    names = [result.name for result in error.failures]
    if not names or not in_table.issuperset(names):
        return str(error)
    checks = "check" if len(names) == 1 else "checks"
    return f"startup failed: {checks} {', '.join(map(repr, names))} failed"


async def _startup_and_shutdown(lifespan: Lifespan) -> None:
    await lifespan.trial_startup()  # a check starts no background task


def _lifespans_of(app: Any) -> list[Lifespan]:
    if isinstance(app, ResilientApp):
        from .doctor import lifespans

        found: list[Lifespan] = lifespans(app)  # the stack's, then the framework's
        return found
    context = getattr(getattr(app, "router", None), "lifespan_context", None)
    if isinstance(context, Lifespan):  # Starlette(lifespan=lifespan) / FastAPI(lifespan=...)
        return [context]
    return [resilient(app).lifespan]


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
