"""Lifespan: fail-fast startup checks, managed resources, SIGTERM draining, orderly shutdown.

``Lifespan`` (in ``_core``) is the public surface and the state machine; each job it runs lives
in a private module of this package:

- ``_checks``: what a check is, its result, and the runner (timeouts, retries, abandoned
  threads of sync checks);
- ``_resources``: the resource stack, opened in order and closed in reverse under timeouts;
- ``_drain``: the SIGTERM handler chained before the server's (drain, then hand over);
- ``_layer``: ``LifespanMiddleware``, the ASGI layer that runs a ``Lifespan`` (and the wrapped
  app's own lifespan) through the phases ``begin_startup``/``finish_startup``/
  ``begin_shutdown``/``finish_shutdown``/``abort_startup`` and counts requests in flight.

States: ``idle`` -> ``starting`` -> ``ready`` -> ``draining`` (SIGTERM) -> ``stopping`` ->
``stopped``; a failed startup ends in ``failed``.
"""

from __future__ import annotations

from ..calls import describe_error as describe_error
from ..exceptions import StartupError as StartupError
from ._checks import Check as Check
from ._checks import CheckResult as CheckResult
from ._core import STARTABLE as STARTABLE
from ._core import Lifespan as Lifespan
from ._core import LifespanState as LifespanState
from ._layer import LifespanMiddleware as LifespanMiddleware
from ._resources import ResourceReport as ResourceReport

__all__ = [
    "Check",
    "CheckResult",
    "Lifespan",
    "LifespanMiddleware",
    "LifespanState",
    "ResourceReport",
    "StartupError",
    "describe_error",
]
