"""``LifespanMiddleware``: a ``Lifespan`` run around any ASGI app, keeping the app's own."""

from __future__ import annotations

import logging
from typing import Literal

import anyio
import anyio.abc

from ..calls import describe_error
from ..exceptions import StartupError
from ..types import ASGIApp, Message, Receive, Scope, Send
from ._core import STARTABLE, Lifespan

__all__ = ["LifespanMiddleware"]


class LifespanMiddleware:
    """Run a ``Lifespan`` around any ASGI app, keeping the app's own lifespan.

    Handles the ``lifespan`` scope: our startup (resources, checks) first, then the app's own
    startup (its state lands in the same state dict, so both are visible to requests); at
    shutdown, in-flight requests first, then the app's own shutdown, then our resources. An app
    that does not speak the lifespan protocol (it raises or returns at once) is simply started
    without it. Counts ``http`` requests and ``websocket`` sessions in flight. Outermost
    layer of the stack; ``resilient()`` puts it there.

    Args:
        app: the ASGI application.
        lifespan: the lifespan to run.
        websocket_app: what handles ``websocket`` scopes instead of ``app`` (``resilient()``
            gives a ``WebSocketMiddleware`` around ``app``, so HTTP requests pay no layer for
            it); ``None``: ``app``.
    """

    def __init__(
        self, app: ASGIApp, *, lifespan: Lifespan, websocket_app: ASGIApp | None = None
    ) -> None:
        if not isinstance(lifespan, Lifespan):
            raise ValueError(f"lifespan must be a Lifespan, got {lifespan!r}")
        if websocket_app is not None and not callable(websocket_app):
            raise ValueError(f"websocket_app must be an ASGI app, got {websocket_app!r}")
        self.app = app
        self.lifespan = lifespan
        self.websocket_app = websocket_app if websocket_app is not None else app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            lifespan = self.lifespan
            if lifespan.values and "state" not in scope:
                scope["state"] = dict(lifespan.values)  # a server without lifespan state
            lifespan.in_flight += 1
            try:
                await (self.app if kind == "http" else self.websocket_app)(scope, receive, send)
            finally:
                lifespan.in_flight -= 1
                if lifespan.in_flight == 0 and lifespan.drained is not None:
                    lifespan.drained.set()
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        lifespan = self.lifespan
        await receive()  # lifespan.startup
        # Several stacks may share one Lifespan (an app factory called twice): the first to
        # start it owns startup, the last to stop it closes the resources.
        owner = lifespan.state in STARTABLE
        if owner:
            try:
                await lifespan.begin_startup()
            except StartupError as exc:
                # Like Starlette: report the failure, then raise so that servers and test
                # harnesses that watch for exceptions (asgi-lifespan) see it too.
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                raise
        lifespan.users += 1
        try:
            await self._run(scope, receive, send, owner)
        finally:
            lifespan.users -= 1

    async def _run(self, scope: Scope, receive: Receive, send: Send, owner: bool) -> None:
        lifespan = self.lifespan
        state = scope.get("state")
        if state is not None:
            state.update(lifespan.values)
        with _InnerLifespan(self.app, scope, lifespan.logger) as inner:
            async with anyio.create_task_group() as group:
                await group.start(inner.run)
                failure = await inner.exchange("startup")
                if failure is None:
                    if owner:
                        lifespan.finish_startup()
                    await send({"type": "lifespan.startup.complete"})
                    await receive()  # lifespan.shutdown
                    last = lifespan.users == 1
                    draining = await lifespan.begin_shutdown() if last else False
                    failure = await inner.exchange("shutdown")
                    if draining:
                        await lifespan.finish_shutdown()
                    phase = "shutdown"
                else:
                    if owner:
                        await lifespan.abort_startup()
                    phase = "startup"
                group.cancel_scope.cancel()
        if failure is None:
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": f"lifespan.{phase}.failed", "message": failure})
        if phase == "startup":
            raise StartupError(failure)


class _InnerLifespan:
    """Plays the server for the wrapped app's own lifespan."""

    def __init__(self, app: ASGIApp, scope: Scope, logger: logging.Logger) -> None:
        self.app = app
        self.scope = scope
        self.logger = logger
        self.supported = True
        self.received = False  # the app called receive(): it speaks the lifespan protocol
        self.to_app, self.app_inbox = anyio.create_memory_object_stream[Message](2)
        self.app_outbox, self.from_app = anyio.create_memory_object_stream[Message](2)

    def __enter__(self) -> _InnerLifespan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for stream in (self.to_app, self.app_inbox, self.app_outbox, self.from_app):
            stream.close()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()

        async def receive() -> Message:
            self.received = True
            return await self.app_inbox.receive()

        try:
            await self.app(self.scope, receive, self.app_outbox.send)
        except Exception as exc:
            await self.app_outbox.send({"type": "_raised", "exception": exc})
        else:
            await self.app_outbox.send({"type": "_returned"})

    async def exchange(self, phase: Literal["startup", "shutdown"]) -> str | None:
        """Send ``lifespan.<phase>``; ``None`` when it completed (or is not supported), else
        the failure message."""
        if not self.supported:
            return None
        await self.to_app.send({"type": f"lifespan.{phase}"})
        reply = await self.from_app.receive()
        if reply["type"] == f"lifespan.{phase}.complete":
            return None
        if reply["type"] == f"lifespan.{phase}.failed":
            return f"application {phase} failed: {reply.get('message', '')}".rstrip(": ")
        exception = reply.get("exception")
        if phase == "startup" and exception is not None and self.received:
            return f"application startup failed: {describe_error(exception)}"
        if phase == "startup":
            # Raised before receiving, or returned: the app does not do lifespan (as uvicorn's
            # "auto" mode and asgi-lifespan decide). It runs without it.
            self.supported = False
            self.logger.debug("The wrapped app does not support the lifespan protocol")
            return None
        return f"application shutdown failed: {describe_error(exception)}" if exception else None
