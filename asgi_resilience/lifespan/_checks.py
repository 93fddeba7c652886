"""Startup and readiness checks: what one is, what one run found, and the runner.

The runner runs checks concurrently, each under its own timeout, retrying at startup with
exponential backoff. A sync check runs in a worker thread, which a timeout cannot stop: the
runner remembers such abandoned threads until they return, so readiness probes do not pile a
new blocked thread onto a dependency that is hanging.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Literal, Protocol

import anyio

from ..calls import call as _call
from ..calls import describe_error

__all__ = ["Check", "CheckFunction", "CheckResult", "CheckRunner"]

CheckFunction = Callable[[], Any]
_MAX_BACKOFF = 2.0


@dataclass(frozen=True)
class Check:
    """A dependency check run at startup and, if ``readiness``, by ``/health/ready``."""

    name: str
    function: CheckFunction
    timeout: float = 5.0
    critical: bool = True
    readiness: bool = True
    attempts: int = 1


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check run: ``ok``, how long it took and why it failed."""

    name: str
    ok: bool
    duration: float
    error: str | None = None
    critical: bool = True
    attempts: int = 1
    timed_out: bool = False

    @property
    def status(self) -> Literal["up", "down"]:
        return "up" if self.ok else "down"

    @property
    def outcome(self) -> Literal["ok", "error", "timeout"]:
        """The ``outcome`` label of the check duration metric."""
        return "ok" if self.ok else "timeout" if self.timed_out else "error"


class _Owner(Protocol):
    logger: logging.Logger


class CheckRunner:
    """Runs checks and keeps count of the sync ones still blocked in an abandoned thread."""

    def __init__(self, owner: _Owner) -> None:
        self.owner = owner  # whose logger reports retries (read each time: it may change)
        self._blocked: dict[str, int] = {}
        self._lock = threading.Lock()

    def blocked(self, name: str) -> int:
        """How many threads of check ``name`` timed out and have not returned yet."""
        with self._lock:
            return self._blocked.get(name, 0)

    async def run(
        self, checks: list[Check], *, startup: bool, into: dict[str, CheckResult]
    ) -> dict[str, CheckResult]:
        """Run ``checks`` concurrently; results land in ``into`` as they finish and are
        returned in the order of ``checks``. At startup each check gets its ``attempts``."""
        async with anyio.create_task_group() as group:
            for check in checks:
                group.start_soon(self._run_one, check, check.attempts if startup else 1, into)
        return {check.name: into[check.name] for check in checks}

    async def _run_one(self, check: Check, attempts: int, results: dict[str, CheckResult]) -> None:
        began = perf_counter()
        error = "not run"
        timed_out = False
        for attempt in range(1, attempts + 1):
            outcome: Any = False
            if attempts == 1 and self.blocked(check.name):
                # A sync check that timed out earlier is still blocked in its thread: a probe
                # does not start another thread for it (startup's own retries still do).
                error, timed_out = "still blocked since an earlier run timed out", True
                break
            function, run = self._tracked(check)
            try:
                # move_on_after, not fail_after: a TimeoutError the check raises itself (a
                # driver's own timeout) is its error, not ours.
                with anyio.move_on_after(check.timeout) as deadline:
                    outcome = await _call(function)
            except Exception as exc:
                error, timed_out = describe_error(exc), False
            else:
                timed_out = deadline.cancelled_caught
                if timed_out:
                    self._abandon(check.name, run)
                    error = f"timed out after {check.timeout:g}s"
                elif outcome is False:
                    error = "returned False"
                else:
                    results[check.name] = CheckResult(
                        check.name, True, perf_counter() - began, None, check.critical, attempt
                    )
                    return
            if attempt < attempts:
                # A warning: the dependency is failing now, even if a retry succeeds; the last
                # attempt's failure is the startup's error (or its degraded warning).
                self.owner.logger.warning(
                    "Check %r attempt %d/%d failed: %s", check.name, attempt, attempts, error
                )
                await anyio.sleep(min(0.1 * 2 ** (attempt - 1), _MAX_BACKOFF))
        results[check.name] = CheckResult(
            check.name, False, perf_counter() - began, error, check.critical, attempts, timed_out
        )

    def _tracked(self, check: Check) -> tuple[Callable[[], Any], dict[str, bool] | None]:
        """``check.function``, and for a sync one a record of its thread: when it returns, an
        abandoned run (timed out while blocked) stops counting against its check."""
        function = check.function
        if inspect.iscoroutinefunction(function):
            return function, None  # cancelled at its timeout: nothing is left running
        run = {"done": False, "abandoned": False}

        def tracked() -> Any:
            try:
                return function()
            finally:
                with self._lock:
                    run["done"] = True
                    if run["abandoned"]:
                        self._blocked[check.name] -= 1

        return tracked, run

    def _abandon(self, name: str, run: dict[str, bool] | None) -> None:
        if run is None:
            return
        with self._lock:
            if not run["done"] and not run["abandoned"]:
                run["abandoned"] = True
                self._blocked[name] = self._blocked.get(name, 0) + 1
