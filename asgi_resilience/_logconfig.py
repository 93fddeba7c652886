"""``asgi-resilience run --log-config``: the user's logging configuration, as uvicorn takes it.

``.json`` and ``.yaml``/``.yml`` files go to ``logging.config.dictConfig``, anything else to
``logging.config.fileConfig`` (an INI file, loggers that exist already kept), exactly as
uvicorn's ``--log-config`` reads them. The configuration then owns every handler and format:
the command installs none of its own, and the access log goes through ``logging`` (logger
``asgi_resilience.access``) so that the configuration carries it too. Every process of the
service applies it (each worker reads it again), before it imports the application.
"""

from __future__ import annotations

import importlib
import json
import logging
import logging.config
import sys
from pathlib import Path
from typing import Any

from .calls import describe_error
from .exceptions import StartupError, UsageError

__all__ = ["apply_log_config", "quiet_startup_echo"]

# The loggers the servers report a failed lifespan startup on.
_SERVER_LOGGERS = ("uvicorn.error", "hypercorn.error", "_granian")
_ACCESS_LOGGER = "asgi_resilience.access"
_LIFESPAN_LOGGER = "asgi_resilience.lifespan"


def apply_log_config(path: Path, *, warn: bool = False) -> None:
    """Configure logging from ``path``; with ``warn``, say on stderr when the configuration
    disabled the access log (``dictConfig``'s ``disable_existing_loggers``, on unless set).

    Raises:
        UsageError: the file cannot be read or configures nothing valid (one line).
    """
    name = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read --log-config {name!r}: {exc.strerror}") from None
    yaml = _yaml(name) if name.endswith((".yaml", ".yml")) else None
    try:
        if name.endswith(".json"):
            logging.config.dictConfig(json.loads(text))
        elif yaml is not None:
            logging.config.dictConfig(yaml.safe_load(text))
        else:
            logging.config.fileConfig(name, disable_existing_loggers=False)
    except Exception as exc:
        raise UsageError(f"--log-config {name}: {_reason(exc)}") from None
    lifespan = logging.getLogger(_LIFESPAN_LOGGER)
    if lifespan.disabled:
        # The one logger that says why a startup failed (the servers' own, disabled too,
        # would have echoed it): kept on, or a failed start would exit without a reason.
        lifespan.disabled = False
    if warn and logging.getLogger(_ACCESS_LOGGER).disabled:
        print(
            f"asgi-resilience: warning: --log-config {name} disabled the loggers that existed "
            f"before it, {_ACCESS_LOGGER} among them (kept on: {_LIFESPAN_LOGGER}): set "
            '"disable_existing_loggers": false',
            file=sys.stderr,
        )


def _yaml(name: str) -> Any:
    try:
        # PyYAML ships no type hints; its one call here needs none.
        yaml = importlib.import_module("yaml")
    except ImportError:
        raise UsageError(
            f"--log-config {name} needs PyYAML: pip install pyyaml (uvicorn[standard] has it)"
        ) from None
    return yaml


def _reason(exc: BaseException) -> str:
    """``dictConfig`` says which handler failed and keeps why in ``__cause__``: both."""
    cause = exc.__cause__
    return describe_error(exc) + (f" ({describe_error(cause)})" if cause is not None else "")


class _StartupEcho(logging.Filter):
    """Drops a server's echo of a startup failure the ``Lifespan`` logged already.

    The lifespan logs its ``StartupError`` (``startup failed: ...``), then sends it in
    ``lifespan.startup.failed``, whose message uvicorn and Granian log again; Granian adds the
    exception's traceback to its own "ASGI lifespan startup failed". The reason is then said
    once, by the lifespan, and no traceback is shown for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _lifespan_logs_errors():
            return True  # the lifespan's own line is not written: the server's says it once
        if isinstance(record.msg, str) and record.msg.startswith("startup failed: "):
            return False
        if record.exc_info and isinstance(record.exc_info[1], StartupError):
            record.exc_info = None
            record.exc_text = None
        return True


def _lifespan_logs_errors() -> bool:
    """Is the lifespan's ``startup failed`` line written? Not when a logging configuration
    disabled its logger (``dictConfig``'s ``disable_existing_loggers``) or raised its level."""
    logger = logging.getLogger(_LIFESPAN_LOGGER)
    return not logger.disabled and logger.isEnabledFor(logging.ERROR)


_ECHO = _StartupEcho()


def quiet_startup_echo() -> None:
    """Install the filter on the servers' loggers (once: ``addFilter`` keeps one copy)."""
    for name in _SERVER_LOGGERS:
        logging.getLogger(name).addFilter(_ECHO)
