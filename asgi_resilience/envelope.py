"""Response envelopes: ``{"success": true, "data": <body>, "meta": {...}}`` without parsing JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable
from json.encoder import encode_basestring
from typing import Any

import anyio

from ._http import media_type
from .context import ContextMiddleware, PathSet, RequestContext, route_path, utc_timestamp
from .types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["EnvelopeMiddleware", "add_envelope_meta", "skip_envelope"]

_PREFIX = b'{"success":true,"data":'
_EMPTY_DATA = b"null"
_FILE_CHUNK = 64 * 1024


def add_envelope_meta(**fields: Any) -> None:
    """Add members to the envelope ``meta`` of the current response (pagination, cursors).

    Call it inside a request handler before the response starts (for a streamed body, before it
    ends). Outside a request it does nothing. Values must be JSON-serialisable.
    """
    context = RequestContext.current()
    if context is not None:
        if context.envelope_meta is None:
            context.envelope_meta = {}
        context.envelope_meta.update(fields)


def skip_envelope() -> None:
    """Send the current request's response as it is, without an envelope."""
    context = RequestContext.current()
    if context is not None:
        context.envelope_skip = True


class EnvelopeMiddleware(ContextMiddleware):
    """Wrap successful JSON bodies as ``{"success": true, "data": ..., "meta": {...}}``.

    Handles ``http`` scopes; others pass through. Wraps 2xx responses (but 204 and 205, which
    have no body) whose ``Content-Type`` is one of ``content_types`` by sending a prefix, the
    application's own body bytes as they come, and a suffix: nothing is parsed or buffered,
    memory stays O(1), and a ``Content-Length`` is corrected (a streamed body has none).
    ``meta`` holds ``request_id``, ``timestamp`` and whatever the handler added with
    ``add_envelope_meta``. A HEAD request gets the headers GET would get, ``Content-Length``
    included (RFC 9110), and no body. Left untouched: other content types, ``Content-Encoding``
    set, ``exclude_paths`` (the path or anything below it) and responses whose handler called
    ``skip_envelope()``. Error responses
    are not its business: ``ErrorMiddleware(format="envelope")`` shapes them. Place it innermost,
    right around the application.

    Args:
        app: the ASGI application.
        exclude_paths: paths (and their subpaths) never enveloped, e.g. ``("/docs",)``.
        content_types: media types wrapped.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        exclude_paths: Iterable[str] = (),
        content_types: Iterable[str] = ("application/json",),
    ) -> None:
        self.app = app
        self.excluded = PathSet(exclude_paths, option="exclude_paths")
        if isinstance(content_types, str):
            raise ValueError(
                f"content_types must be a list, e.g. [{content_types!r}], not a string"
            )
        self.content_types = frozenset(t.strip().lower().encode("latin-1") for t in content_types)
        if not self.content_types:
            raise ValueError("content_types must name at least one media type")

    async def handle(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if (route_path(scope) if scope.get("root_path") else scope["path"]) in self.excluded:
            await self.app(scope, receive, send)
            return
        responder = _EnvelopeResponder(self, context, send, scope["method"] == "HEAD")
        await self.app(scope, receive, responder.send)


class _EnvelopeResponder:
    __slots__ = (
        "body_sent",
        "content_types",
        "context",
        "head",
        "send_downstream",
        "suffix",
        "wrapping",
    )

    def __init__(
        self, middleware: EnvelopeMiddleware, context: RequestContext, send: Send, head: bool
    ):
        self.head = head  # HEAD: the headers GET would have, the (empty) body left alone
        self.content_types = middleware.content_types
        self.context = context
        self.send_downstream = send
        self.wrapping = False
        self.body_sent = False  # the prefix went out (followed by data, or by null)
        self.suffix: bytes | None = None

    async def send(self, message: Message) -> None:
        message_type = message["type"]
        if message_type == "http.response.start":
            message = self._start(message)
        elif self.wrapping:
            if message_type == "http.response.body":
                message = self._body(message)
            elif message_type == "http.response.pathsend":
                await self._pathsend(message)
                return
        await self.send_downstream(message)

    def _start(self, message: Message) -> Message:
        status = message["status"]
        if not 200 <= status < 300 or status in (204, 205) or self.context.envelope_skip:
            return message
        content_length = None
        is_json = False
        for name, value in message.get("headers", ()):
            lowered = name.lower()
            if lowered == b"content-type":
                if media_type(value) not in self.content_types:
                    return message
                is_json = True
            elif lowered == b"content-encoding":
                return message  # compressed bytes cannot sit inside our JSON
            elif lowered == b"content-length":
                content_length = value
        if not is_json:
            return message
        self.wrapping = not self.head
        if content_length is None:
            return message  # streamed: no length to fix, meta is written at the end
        try:
            length = int(content_length)
        except ValueError:
            self.wrapping = False  # a length we cannot fix: leave the response as it is
            return message
        self.suffix = self._suffix()
        length += len(_PREFIX) + len(self.suffix) + (len(_EMPTY_DATA) if length == 0 else 0)
        headers = [
            (name, str(length).encode() if name.lower() == b"content-length" else value)
            for name, value in message["headers"]
        ]
        return {**message, "headers": headers}

    def _body(self, message: Message) -> Message:
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        parts = []
        if not self.body_sent and (body or not more_body):
            parts.append(_PREFIX)
            self.body_sent = True
            if not body and not more_body:
                parts.append(_EMPTY_DATA)
        parts.append(body)
        if not more_body:
            parts.append(self.suffix if self.suffix is not None else self._suffix())
        return {**message, "body": b"".join(parts)}

    async def _pathsend(self, message: Message) -> None:
        # The file's bytes must sit between prefix and suffix: read it rather than let the
        # server send it whole.
        async with await anyio.open_file(message["path"], "rb") as file:
            while chunk := await file.read(_FILE_CHUNK):
                await self.send_downstream(
                    self._body({"type": "http.response.body", "body": chunk, "more_body": True})
                )
        await self.send_downstream(self._body({"type": "http.response.body", "body": b""}))

    def _suffix(self) -> bytes:
        context = self.context
        request_id = context.request_id
        encoded_id = "null" if request_id is None else encode_basestring(request_id)
        meta = f'"request_id":{encoded_id},"timestamp":"{utc_timestamp()}"'
        if context.envelope_meta:
            fields = {k: v for k, v in context.envelope_meta.items() if k not in _OWN_META}
            if fields:
                meta += "," + _encode(fields)[1:-1]
        return f',"meta":{{{meta}}}}}'.encode()


_OWN_META = frozenset({"request_id", "timestamp"})
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
