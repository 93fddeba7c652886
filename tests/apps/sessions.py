"""A WebSocket echo service for tests/test_websockets.py, served by a real uvicorn.

``/ws`` accepts, sends the request id it sees (``get_request_id()``), then echoes every text
message until the client leaves. ``DRAIN_DELAY``: the lifespan's drain delay.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from asgi_resilience import Lifespan, get_request_id, resilient


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(f"id {get_request_id()}")
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


lifespan = Lifespan(drain_delay=float(os.environ.get("DRAIN_DELAY", "0")))
app = resilient(Starlette(routes=[WebSocketRoute("/ws/{room}", echo)]), lifespan=lifespan)
