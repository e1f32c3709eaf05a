"""A real websocket client (``websockets``) against the daphne servers of the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


@asynccontextmanager
async def websocket(port: int, cookie: str) -> AsyncIterator[ClientConnection]:
    async with connect(
        f"ws://127.0.0.1:{port}/ws/events/",
        origin=f"http://127.0.0.1:{port}",  # type: ignore[arg-type]
        additional_headers={"Cookie": f"sessionid={cookie}"},
        open_timeout=10,
    ) as ws:
        yield ws


async def receive(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def subscribe(
    ws: ClientConnection, topic: str, since: str | None = None
) -> tuple[list[dict[str, Any]], Any]:
    """Subscribe; returns the replayed event frames and the ``subscribed`` frame."""
    request: dict[str, Any] = {"type": "subscribe", "topic": topic}
    if since is not None:
        request["since"] = since
    await ws.send(json.dumps(request))
    replayed: list[dict[str, Any]] = []
    while True:
        frame = await receive(ws)
        if frame["type"] == "subscribed":
            return replayed, frame
        assert frame["type"] == "event", frame
        replayed.append(frame["event"])
