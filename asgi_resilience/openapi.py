"""The stack's error responses in a FastAPI application's OpenAPI document.

The error layer turns every error into one shape (RFC 9457 ``application/problem+json``, or the
envelope's error), and the limits answer 413, 429, 503 and 504 before the application runs; none
of that is in the document FastAPI generates, which describes its own ``HTTPValidationError``
422 instead. ``document_errors(app, ...)`` completes the document: the ``Problem`` (or
``ErrorEnvelope``) schema in ``components``, a reusable response per status, and on each operation
the error responses it can get. ``resilient()`` calls it for a FastAPI app with the statuses its
options make possible (429 only with a rate limit and outside its exempt paths, 504 only where a
deadline applies, 413 only with a body limit and on operations that take a body, ...).

It works on the document, not on FastAPI's internals: ``app.openapi`` is wrapped so that the
document FastAPI builds (and caches, once) is completed the first time it is asked for.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from typing import Any

from .context import PathSet, path_matcher
from .exceptions import status_phrase

__all__ = ["DEFAULT_STATUSES", "document_errors"]

# An operation's error statuses: a fixed set, or (path template, method, operation) -> statuses.
Statuses = Iterable[int] | Callable[[str, str, dict[str, Any]], Iterable[int]]

# What any application behind the error layer can answer: 422 where FastAPI validates
# parameters or a body (it documents those operations itself), 500 anywhere.
DEFAULT_STATUSES = (422, 500)

_PROBLEM = "application/problem+json"
_JSON = "application/json"
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# Why the stack answers each status, for the response's description.
_WHY = {
    400: "The request was malformed (such as an invalid request id header).",
    404: "Nothing is found at this path, or the resource does not exist.",
    413: "The request body is larger than the limit.",
    422: "The parameters or the body did not validate; `errors` lists each problem.",
    429: "Too many requests from this client: wait `Retry-After` seconds.",
    500: "An unexpected error. In production the body says nothing of its cause; the "
    "`request_id` finds it in the logs.",
    503: "The service is overloaded or a dependency is unavailable: retry after "
    "`Retry-After` seconds.",
    504: "The request did not complete within its deadline.",
}

_RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 0},
}
_HEADERS: dict[int, dict[str, Any]] = {
    429: {
        "Retry-After": _RETRY_AFTER,
        "RateLimit": {
            "description": "The client's remaining quota (IETF RateLimit header fields).",
            "schema": {"type": "string"},
        },
        "RateLimit-Policy": {
            "description": "The quota policies that apply (IETF RateLimit header fields).",
            "schema": {"type": "string"},
        },
    },
    503: {"Retry-After": _RETRY_AFTER},
}

_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem: every error response of this service has this shape.",
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "description": "A URI naming the problem type."},
        "title": {"type": "string", "description": "The status's reason phrase."},
        "status": {"type": "integer", "description": "The HTTP status code."},
        "detail": {"type": "string", "description": "What went wrong, for a human."},
        "instance": {"type": "string", "description": "The request's path."},
        "code": {"type": "string", "description": "A stable, machine-readable error code."},
        "request_id": {
            "type": ["string", "null"],
            "description": "The request's id, as in the X-Request-ID header.",
        },
        "trace_id": {"type": "string", "description": "The request's trace id, when traced."},
        "errors": {
            "type": "array",
            "description": "Validation errors (422): where and why.",
            "items": {"type": "object"},
        },
    },
    "additionalProperties": True,
}
_META_SCHEMA: dict[str, Any] = {
    "title": "EnvelopeMeta",
    "type": "object",
    "required": ["request_id", "timestamp"],
    "properties": {
        "request_id": {"type": ["string", "null"]},
        "timestamp": {"type": "string", "format": "date-time"},
    },
    "additionalProperties": True,
}
_ENVELOPE_ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorEnvelope",
    "description": "The envelope of every error response of this service.",
    "type": "object",
    "required": ["success", "error", "meta"],
    "properties": {
        "success": {"type": "boolean", "const": False},
        "error": {
            "type": "object",
            "required": ["code", "message", "status"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "status": {"type": "integer"},
                "details": {},
            },
        },
        "meta": {},  # the EnvelopeMeta reference, once its name is known
    },
}


def document_errors(
    app: Any,
    statuses: Statuses = DEFAULT_STATUSES,
    *,
    format: str = "problem",
    envelope: bool = False,
    exclude_paths: Iterable[str] = (),
) -> None:
    """Add the error responses of the asgi_resilience stack to ``app``'s OpenAPI document.

    For a FastAPI application (or anything with FastAPI's ``openapi()``/``openapi_schema``):
    from the next time the document is built, ``components`` has the error schema and one
    response per status, and each operation lists ``statuses`` (each a ``$ref`` to those
    responses). The 422 FastAPI documents itself (its ``HTTPValidationError``) is replaced: the
    error layer answers validation errors in its own shape. A status the operation already
    documents keeps its description; its body becomes the error shape too, since the error
    layer rewrites every error body the application returns.

    Args:
        app: the FastAPI application.
        statuses: the statuses every operation can get, or a callable ``(path, method,
            operation) -> statuses`` (the path is the document's template, ``/users/{id}``).
            422 is only added where FastAPI validates something (where it documented a 422).
        format: ``"problem"`` (RFC 9457) or ``"envelope"``: the shape ``ErrorMiddleware``
            answers in.
        envelope: successful JSON responses are wrapped by ``EnvelopeMiddleware``: their
            schemas become ``{"success": true, "data": <schema>, "meta": {...}}``.
        exclude_paths: paths (and below) ``EnvelopeMiddleware`` leaves alone.

    Raises:
        ValueError: ``app`` has no OpenAPI document to complete, or an option is wrong.
    """
    if format not in ("problem", "envelope"):
        raise ValueError(f"format must be 'problem' or 'envelope', got {format!r}")
    if callable(statuses):
        per_operation = statuses
    else:
        fixed = tuple(_status(status) for status in statuses)

        def per_operation(path: str, method: str, operation: dict[str, Any]) -> Iterable[int]:
            return fixed

    _document(app, per_operation, format, envelope, exclude_paths, rewrites=True)


def _document(
    app: Any,
    statuses: Callable[[str, str, dict[str, Any]], Iterable[int]],
    format: str,
    envelope: bool,
    exclude_paths: Iterable[str],
    *,
    rewrites: bool,
) -> None:
    """``document_errors``; ``rewrites``: an error layer rewrites the app's error responses."""
    build = getattr(app, "openapi", None)
    if not callable(build) or not hasattr(app, "openapi_schema"):
        raise ValueError(
            f"document_errors() completes a FastAPI application's OpenAPI document; {app!r} "
            "has none (no openapi() method)"
        )
    # Documented before (resilient() did, and now the user by hand): the last word wins.
    build = getattr(build, "_documents", build)
    excluded = PathSet(exclude_paths, option="exclude_paths")
    completed: list[dict[str, Any]] = []  # the document completed last (FastAPI caches it)

    def openapi() -> dict[str, Any]:
        document: dict[str, Any] = build()
        if not completed or completed[0] is not document:
            _complete(document, statuses, format, envelope, excluded, rewrites)
            completed[:] = [document]
        return document

    openapi._documents = build  # type: ignore[attr-defined]
    app.openapi = openapi
    app.openapi_schema = None  # built before: build it again, completed


def _status(status: Any) -> int:
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise ValueError(f"statuses must be HTTP error statuses (400-599), got {status!r}")
    return status


def _complete(
    document: dict[str, Any],
    statuses: Callable[[str, str, dict[str, Any]], Iterable[int]],
    format: str,
    envelope: bool,
    excluded: PathSet,
    rewrites: bool,
) -> None:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    responses = components.setdefault("responses", {})
    # OpenAPI 3.0 has no JSON Schema type lists or const: say the same its way.
    adapt = _as_openapi_30 if str(document.get("openapi", "")).startswith("3.0") else _same
    meta_ref = ""
    if format == "envelope" or envelope:
        meta_ref = _SCHEMAS + _claim(schemas, "EnvelopeMeta", adapt(_META_SCHEMA))
    if format == "problem":
        reference = _SCHEMAS + _claim(schemas, "Problem", adapt(_PROBLEM_SCHEMA))
        media = _PROBLEM
    else:
        error_schema = _with_meta(_ENVELOPE_ERROR_SCHEMA, meta_ref)
        reference = _SCHEMAS + _claim(schemas, "ErrorEnvelope", adapt(error_schema))
        media = _JSON
    error_content = {media: {"schema": {"$ref": reference}}}
    for path, item in (document.get("paths") or {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if not isinstance(operation, dict):
                continue
            documented = operation.setdefault("responses", {})
            for code in sorted({_status(status) for status in statuses(path, method, operation)}):
                if code == 422 and "422" not in documented:
                    continue  # nothing validated here: FastAPI would never answer 422
                name = _claim(responses, _response_name(code), _response(code, error_content))
                existing = documented.get(str(code))
                if existing is None or (rewrites and _is_fastapis_validation_error(existing, code)):
                    documented[str(code)] = {"$ref": f"#/components/responses/{name}"}
            for code, response in documented.items() if rewrites else ():
                if _is_error(code) and isinstance(response, dict) and "$ref" not in response:
                    # The application's own error responses: rewritten by the error layer.
                    content = response.get("content") or {}
                    if _PROBLEM not in content:
                        response["content"] = copy.deepcopy(error_content)
            if envelope and path not in excluded:
                _envelope_successes(documented, meta_ref, adapt)
            operation["responses"] = dict(sorted(documented.items()))


_SCHEMAS = "#/components/schemas/"


def _claim(taken: dict[str, Any], name: str, value: dict[str, Any]) -> str:
    """Put ``value`` under ``name`` in ``components`` and return the name used: ``name``
    unless the application has something else there (a model of its own called ``Problem``),
    then ``AsgiResilience<name>``, so that nothing of the application's is overwritten."""
    for candidate in (name, f"AsgiResilience{name}"):
        if taken.get(candidate, value) == value:
            taken[candidate] = value
            return candidate
    taken[f"AsgiResilience{name}"] = value  # ours: the name says so
    return f"AsgiResilience{name}"


def _with_meta(schema: dict[str, Any], meta_ref: str) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schema["properties"]["meta"] = {"$ref": meta_ref}
    return schema


def _same(schema: Any) -> Any:
    return copy.deepcopy(schema)


def _as_openapi_30(schema: Any) -> Any:
    """A copy of ``schema`` in OpenAPI 3.0's dialect: ``"type": ["string", "null"]`` becomes
    ``"type": "string", "nullable": true`` and ``const`` a one-value ``enum``."""
    if isinstance(schema, list):
        return [_as_openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    adapted: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, list):
            kinds = [kind for kind in value if kind != "null"]
            adapted["type"] = kinds[0] if len(kinds) == 1 else kinds
            if "null" in value:
                adapted["nullable"] = True
        elif key == "const":
            adapted["enum"] = [value]
        else:
            adapted[key] = _as_openapi_30(value)
    return adapted


def _response(code: int, content: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _WHY.get(code, status_phrase(code)),
        "content": copy.deepcopy(content),
    }
    if code in _HEADERS:
        response["headers"] = copy.deepcopy(_HEADERS[code])
    return response


def _response_name(code: int) -> str:
    """``429`` -> ``TooManyRequests``: the reusable response's name in ``components``."""
    words = status_phrase(code).replace("-", " ").split()
    return "".join(word[:1].upper() + word[1:] for word in words) or f"Error{code}"


def _is_fastapis_validation_error(response: Any, code: int) -> bool:
    if code != 422 or not isinstance(response, dict):
        return False
    schema = (response.get("content") or {}).get(_JSON, {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


def _is_error(code: str) -> bool:
    return (code.isdigit() and 400 <= int(code) <= 599) or code in ("4XX", "5XX")


def _envelope_successes(
    documented: dict[str, Any], meta_ref: str, adapt: Callable[[Any], Any]
) -> None:
    """2xx JSON bodies (not 204/205) as the envelope wraps them."""
    for code, response in documented.items():
        if not (code.isdigit() and 200 <= int(code) < 300) or code in ("204", "205"):
            continue
        if not isinstance(response, dict):
            continue
        body = (response.get("content") or {}).get(_JSON)
        if not isinstance(body, dict):
            continue
        data = body.get("schema", {})
        wrapper = {
            "type": "object",
            "required": ["success", "data", "meta"],
            "properties": {
                "success": {"type": "boolean", "const": True},
                "data": {},
                "meta": {"$ref": meta_ref},
            },
        }
        wrapped = adapt(wrapper)
        wrapped["properties"]["data"] = data  # the app's own schema, as FastAPI wrote it
        body["schema"] = wrapped


def stack_statuses(options: Any) -> Callable[[str, str, dict[str, Any]], Iterable[int]]:
    """The error statuses the stack ``resilient()`` builds from ``options`` (its ``Options``)
    can answer on an operation: its layers' own answers and, with the error layer, 422 and 500.
    Route options are matched against the document's path templates as the layers match request
    paths: a template key (``/reports/{id}``) against the same template, a prefix against the
    template and everything below it."""
    exempt = PathSet(options.rate_limit_exempt_paths, option="rate_limit_exempt_paths")

    def statuses(path: str, method: str, operation: dict[str, Any]) -> Iterable[int]:
        found = set(DEFAULT_STATUSES) if options.errors else set()
        if options.rate_limit is not None and path not in exempt:
            found.add(429)
            if options.rate_limit_on_backend_error == "deny":
                found.add(503)
        if options.max_concurrency is not None:
            found.add(503)
        if _by_route(options.timeout, options.timeout_routes, path) is not None:
            found.add(504)
        limit = _by_route(options.max_body_size, options.body_limit_routes, path)
        if limit is not None and "requestBody" in operation:
            found.add(413)
        return found

    return statuses


_PARAMETER = re.compile(r"\{[^}]*\}")


def _by_route(default: Any, routes: Any, template: str) -> Any:
    """What ``routes`` (first match wins) or ``default`` gives the operation at ``template``."""
    for key, value in (routes or {}).items():
        if _matches(key, template):
            return value
    return default


def _matches(key: str, template: str) -> bool:
    if "{" in key:
        if _PARAMETER.sub("{}", key) == _PARAMETER.sub("{}", template):
            return True
        return "{" not in template and path_matcher(key)(template)
    return path_matcher(key)(template)
