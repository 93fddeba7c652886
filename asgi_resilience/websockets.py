"""WebSocket sessions as first-class: a request id, metrics, and a drain that closes them.

``WebSocketMiddleware`` handles ``websocket`` scopes (others pass through untouched):

- a request id, from the upgrade request's header (the same rules as ``RequestIdMiddleware``:
  a valid incoming id is kept, an invalid one replaced or, with ``on_invalid="reject"``, the
  connection refused) or generated; ``get_request_id()`` returns it in the handler for the whole
  session, and the id is echoed in the headers of the ``websocket.accept``;
- ``asgi_resilience_websocket_sessions_active{route}`` (gauge) from accept to the end, and
  ``asgi_resilience_websocket_session_duration_seconds{route}`` (histogram) of each accepted
  session, by route template;
- with a ``Lifespan``: while it drains or stops, a new connection is refused (closed before
  accept: the server answers the upgrade with 403); when the drain delay ends
  (``lifespan.going_away``) every open session is closed with code 1001 ("going away"), before
  the server's own shutdown, which would otherwise cut them (uvicorn with 1012) or wait for
  them. After that close the application's sends are dropped, not errors, and its ``receive``
  gets the disconnect as the server delivers it.

Rate limits, the error layer and envelopes leave WebSockets alone; a session counts as in flight
for the drain (``LifespanMiddleware``).
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Gauge, Histogram

from ._checks import check_instance, check_registry
from .context import CONTEXT_KEY, RequestContext, _current
from .lifespan import Lifespan
from .metrics import Metrics, collectors
from .observe import REPLY
from .request_id import RequestIdMiddleware
from .types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GOING_AWAY", "WebSocketMiddleware"]

GOING_AWAY = 1001  # RFC 6455 7.4.1: the server is going down
SESSION_BUCKETS = (0.1, 1, 10, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)


@collectors
class WebSocketCollectors:
    """Open WebSocket sessions and how long each lasted, by route template."""

    def __init__(self, registry: CollectorRegistry, request_path: Any) -> None:
        self.sessions_active = Gauge(
            "asgi_resilience_websocket_sessions_active",
            "Accepted WebSocket sessions open now.",
            ["route"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.session_duration = Histogram(
            "asgi_resilience_websocket_session_duration_seconds",
            "Duration of accepted WebSocket sessions, from accept to close.",
            ["route"],
            buckets=SESSION_BUCKETS,
            registry=registry,
        )


class WebSocketMiddleware:
    """Request ids, metrics and draining for WebSocket sessions (see the module docstring).

    Args:
        app: the ASGI application.
        lifespan: whose drain refuses new sessions and closes open ones; ``None``: no draining.
        request_ids: the ``RequestIdMiddleware`` whose header and rules the upgrade's id
            follows; ``None``: no request ids.
        registry: the Prometheus registry (the global one by default).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        lifespan: Lifespan | None = None,
        request_ids: RequestIdMiddleware | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if lifespan is not None:
            check_instance("lifespan", lifespan, Lifespan, "a Lifespan or None")
        if request_ids is not None:
            check_instance("request_ids", request_ids, RequestIdMiddleware, "a RequestIdMiddleware")
        self.app = app
        self.lifespan = lifespan
        self.request_ids = request_ids
        self.metrics = Metrics.for_registry(check_registry("registry", registry))
        self.collectors = self.metrics.feature(WebSocketCollectors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        context = scope.get(CONTEXT_KEY)
        token = None
        if context is None:
            context = scope[CONTEXT_KEY] = RequestContext(scope)
            token = _current.set(context)
        try:
            await self._session(context, scope, receive, send)
        finally:
            if token is not None:
                _current.reset(token)

    async def _session(
        self, context: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if self.request_ids is not None:
            refused = self.request_ids.enter(context, scope) is REPLY
            headers = list(context.response_headers or ())
            if refused:
                await _refuse(receive, send)
                return
        lifespan = self.lifespan
        if lifespan is not None and lifespan.state in ("draining", "stopping", "stopped"):
            await _refuse(receive, send)
            return
        session = _Session(self, scope, send, headers)
        going_away = lifespan.going_away if lifespan is not None else None
        if going_away is None:
            try:
                await self.app(scope, receive, session.send)
            finally:
                session.end()
            return
        error: Exception | None = None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(session.close_when, going_away)
                try:
                    await self.app(scope, session.receiver(receive), session.send)
                except Exception as exc:  # raised as itself below, not in a task group's group
                    error = exc
                finally:
                    group.cancel_scope.cancel()
        finally:
            session.end()
        if error is not None:
            raise error


class _Session:
    """One session's send: the id header on its accept, metrics from accept, our close."""

    def __init__(
        self,
        layer: WebSocketMiddleware,
        scope: Scope,
        send: Send,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.layer = layer
        self.scope = scope
        self.server_send = send
        self.headers = headers
        self.accepted_at: float | None = None
        self.route = ""
        self.closed_by_us = False
        self.closed = False  # closed, refused or left: nothing for us to close any more

    def receiver(self, receive: Receive) -> Receive:
        """``receive``, noting a disconnect (the client left: no close of ours after it)."""

        async def receive_noting() -> Message:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.closed = True
            return message

        return receive_noting

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.closed_by_us:
            # We closed it (going away): what the server would answer a send on a closed
            # socket, so that a handler that only sends learns the session is over (Starlette
            # turns it into WebSocketDisconnect).
            raise OSError("the WebSocket was closed: the server is shutting down")
        if kind == "websocket.accept" and self.accepted_at is None:
            if self.headers:
                message = {**message, "headers": [*message.get("headers", ()), *self.headers]}
            await self.server_send(message)
            self.accepted_at = perf_counter()
            self.route = _route_of(self.scope)
            self.layer.metrics.child(self.layer.collectors.sessions_active, self.route).inc()
            return
        if kind == "websocket.close" or kind == "websocket.http.response.start":
            self.closed = True  # closed by the app, or refused with a response of its own
        await self.server_send(message)

    async def close_when(self, going_away: anyio.Event) -> None:
        await going_away.wait()
        if self.closed or self.closed_by_us:
            return
        self.closed_by_us = True
        message: Message = {"type": "websocket.close", "code": GOING_AWAY}
        if self.accepted_at is not None:
            message["reason"] = "server shutting down"
        try:
            await self.server_send(message)
        except Exception:  # the connection went meanwhile: nothing left to close
            pass

    def end(self) -> None:
        if self.accepted_at is None:
            return
        metrics = self.layer.metrics
        metrics.child(self.layer.collectors.sessions_active, self.route).dec()
        metrics.child(self.layer.collectors.session_duration, self.route).observe(
            perf_counter() - self.accepted_at
        )
        self.accepted_at = None


def _route_of(scope: Scope) -> str:
    context: RequestContext = scope[CONTEXT_KEY]
    return context.route(scope)


async def _refuse(receive: Receive, send: Send) -> None:
    """Close before accept: the server answers the upgrade request with 403."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": GOING_AWAY})
