"""HTTP details every layer needs the same way: method labels, header names, header lookups,
media types. Private: the public modules re-export what they document."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "HEADER_NAME",
    "HEADER_NAME_BYTES",
    "KNOWN_METHODS",
    "OTHER_METHOD",
    "first_header",
    "media_type",
    "method_label",
]

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)
OTHER_METHOD = "_OTHER"  # as OpenTelemetry's HTTP conventions name unknown methods
# A header name: an RFC 9110 token.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADER_NAME_BYTES = re.compile(HEADER_NAME.pattern.encode())


def method_label(method: str) -> str:
    """``method``, or ``_OTHER`` for a method outside the standard ones: a bounded label set
    for metrics and span names, whatever clients send."""
    return method if method in KNOWN_METHODS else OTHER_METHOD


def first_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of the header ``name`` (lowercase, as ASGI servers give names)."""
    for key, value in headers:
        if key == name:
            return value
    return None


def media_type(value: bytes) -> bytes:
    """The media type of a ``Content-Type`` value: ``b"application/json"`` for
    ``b"Application/JSON; charset=utf-8"``."""
    return value.split(b";", 1)[0].strip().lower()
