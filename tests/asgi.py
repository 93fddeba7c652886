"""Helpers to drive ASGI applications directly, message by message."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from asgi_resilience.types import ASGIApp, Message, Scope


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    headers: Sequence[tuple[bytes, bytes]] = (),
    query_string: bytes = b"",
    extensions: dict[str, Any] | None = None,
) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query_string,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


class Response:
    """The messages an application sent for one request, and what they add up to."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one http.response.start, got {len(starts)}"
        return starts[0]

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.start["headers"]}

    def header_list(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.start["headers"] if k.lower() == key]

    @property
    def body_messages(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.body_messages)

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: ASGIApp,
    scope: Scope | None = None,
    *,
    body: bytes = b"",
    receive: Callable[[], Awaitable[Message]] | None = None,
) -> Response:
    """Run one request through ``app`` and return what it sent."""
    messages: list[Message] = []
    sent_request = False

    async def default_receive() -> Message:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope if scope is not None else http_scope(), receive or default_receive, send)
    return Response(messages)


def layers(app: object) -> list[object]:
    """The layers from ``app`` inwards (``ResilientApp.stack``, each middleware's ``app``), the
    observers an ``Observers`` runs in one pass listed in its place, in their order."""
    from asgi_resilience.observe import Observers

    found: list[object] = []
    layer: object | None = app
    while layer is not None:
        if isinstance(layer, Observers):
            found.extend(layer.observers)
        else:
            found.append(layer)
        layer = getattr(layer, "stack", None) or getattr(layer, "app", None)
    return found
