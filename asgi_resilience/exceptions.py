"""Exceptions raised by asgi_resilience and the HTTP errors applications raise.

Every exception class of the package lives here (each is also importable from the module
that raises it, its old place). Library errors share one root::

    AsgiResilienceError
    ├── ConfigurationError    an option or environment value cannot be used (also ValueError)
    ├── StartupError          a critical check failed or a resource did not open (``failures``)
    ├── BackendError          the rate limit backend failed (unreachable, slow, nonsense)
    ├── ReplyError            an error reply from Redis (``MOVED``, ``NOSCRIPT``...), internal
    ├── DatabaseUnavailable   the database could not answer ``SELECT 1``
    ├── CircuitOpenError      a circuit breaker refused a call (carries ``retry_after``)
    ├── MissingExtra          an optional dependency is missing (also ModuleNotFoundError)
    └── UsageError            a bad command-line argument (one line, exit code 2)

HTTP errors an application raises to answer with a given status; ``ErrorMiddleware`` turns each
into one JSON body (RFC 9457 problem or envelope)::

    AppError                  status 500 unless given
    ├── BadRequest            400
    ├── Unauthorized          401
    ├── Forbidden             403
    ├── NotFound              404
    ├── Conflict              409
    ├── UnprocessableEntity   422
    ├── TooManyRequests       429
    └── ServiceUnavailable    503
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .lifespan import CheckResult

__all__ = [
    "AppError",
    "AsgiResilienceError",
    "BackendError",
    "BadRequest",
    "CircuitOpenError",
    "ConfigurationError",
    "Conflict",
    "DatabaseUnavailable",
    "Forbidden",
    "MissingExtra",
    "NotFound",
    "ReplyError",
    "ServiceUnavailable",
    "StartupError",
    "TooManyRequests",
    "Unauthorized",
    "UnprocessableEntity",
    "UsageError",
]

_NON_WORD = re.compile(r"[^0-9a-zA-Z]+")


def status_phrase(status: int) -> str:
    """The standard reason phrase for ``status`` (``"Error"`` for unknown codes)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def snake_case(text: str) -> str:
    """``"Method Not Allowed"`` -> ``"method_not_allowed"``: the form of every error ``code``."""
    return _NON_WORD.sub("_", text).strip("_").lower() or "error"


class AsgiResilienceError(Exception):
    """Root of the errors this library raises."""


class ConfigurationError(AsgiResilienceError, ValueError):
    """An option (from the environment or a keyword) has a value that cannot be used."""


class StartupError(AsgiResilienceError):
    """Startup failed: a critical check failed or a resource could not be opened.

    Attributes:
        failures: the failed critical checks (empty when a resource failed).
    """

    def __init__(self, message: str, failures: tuple[CheckResult, ...] = ()) -> None:
        super().__init__(message)
        self.failures = failures


class BackendError(AsgiResilienceError):
    """The rate limit backend failed (unreachable, timed out, answered nonsense)."""


class ReplyError(AsgiResilienceError):
    """An error reply from Redis (``NOSCRIPT ...``, ``MOVED 1234 host:port``, ``READONLY``)."""


class DatabaseUnavailable(AsgiResilienceError):
    """The database could not be reached or could not answer ``SELECT 1``."""


class UsageError(AsgiResilienceError):
    """A bad command-line argument: reported on one line, exit code 2."""


class MissingExtra(AsgiResilienceError, ModuleNotFoundError):
    """An optional dependency is not installed: the message names the extra that has it
    (``pip install 'asgi-resilience[redis]'``); the command line prints it as its one line."""


class CircuitOpenError(AsgiResilienceError):
    """A circuit breaker is open and refused the call.

    Args:
        breaker: the name of the breaker.
        retry_after: seconds until the breaker lets a trial call through.
    """

    def __init__(self, breaker: str, retry_after: float) -> None:
        if retry_after > 0:
            message = f"circuit breaker {breaker!r} is open; retry in {retry_after:.1f}s"
        else:
            message = f"circuit breaker {breaker!r} is busy with its trial calls; retry shortly"
        super().__init__(message)
        self.breaker = breaker
        self.retry_after = retry_after


class AppError(Exception):
    """An error the application raises to answer with ``status`` and a JSON error body.

    Subclasses fix the status with ``default_status = 402`` (``NotFound``, ``Conflict``, ...;
    a plain ``status = 402`` class attribute is read the same way). ``ErrorMiddleware`` renders
    it as RFC 9457 ``application/problem+json`` (or the envelope error shape), keeps
    ``headers`` on the response and adds ``extra`` as extension members.

    Args:
        detail: a human-readable explanation for this occurrence; shown to the client.
        status: the HTTP status code (400-599).
        code: a stable snake_case identifier for clients; defaults to the title in snake_case.
        title: a short summary of the problem type; defaults to the status reason phrase.
        headers: response headers to send with the error (``WWW-Authenticate``, ``Retry-After``).
        extra: additional members for the body (must be JSON-serialisable).
    """

    default_status: ClassVar[int] = 500

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("status")
        if isinstance(declared, int) and not isinstance(declared, bool):
            cls.default_status = declared  # ``status = 402``, the obvious spelling, works too
            del cls.status  # the instance property answers again

    def __init__(
        self,
        detail: str | None = None,
        *,
        status: int | None = None,
        code: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        status = type(self).default_status if status is None else status
        if not 400 <= status <= 599:
            raise ValueError(f"AppError status must be between 400 and 599, got {status!r}")
        self.status_code = status  # as Starlette's HTTPException names it
        self.title = title or status_phrase(status)
        self.detail = detail
        self.code = code or snake_case(self.title)
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = dict(extra or {})
        super().__init__(detail or self.title)

    @property
    def status(self) -> int:
        """The HTTP status of this error (``status_code``)."""
        return self.status_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status_code}, detail={self.detail!r})"


class BadRequest(AppError):
    """400: the request is malformed."""

    default_status = 400


class Unauthorized(AppError):
    """401: authentication is missing or invalid."""

    default_status = 401


class Forbidden(AppError):
    """403: authenticated, but not allowed."""

    default_status = 403


class NotFound(AppError):
    """404: the resource does not exist."""

    default_status = 404


class Conflict(AppError):
    """409: the request conflicts with the resource's current state."""

    default_status = 409


class UnprocessableEntity(AppError):
    """422: well-formed but semantically invalid input."""

    default_status = 422


class TooManyRequests(AppError):
    """429: the client is being rate limited."""

    default_status = 429


class ServiceUnavailable(AppError):
    """503: a dependency is down or the service is draining."""

    default_status = 503
