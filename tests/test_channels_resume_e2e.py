"""A browser that stays connected while the listener is restarted misses nothing (issue 16).

Real servers: daphne, ``manage.py eventbus_listen`` on a Redis bus, the channels-redis
pub/sub layer. A websocket client stays subscribed while 500 products are saved; during
the saves the listener gets SIGTERM, stays down for a while, and a new one starts.
The forwarder is a durable consumer: the new listener resumes from its cursor, so the
client receives each of the 500 events exactly once, in log order.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from django_eventbus.models import StoredEvent
from testproject.inventory.models import Product
from tests.live_websocket import subscribe, websocket
from tests.orm import orm
from tests.polling import await_until as wait_for
from tests.services import require_redis
from tests.websocket_support import Server, Stack, make_user, session_cookie, stack_env, wait_for_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis, pytest.mark.slow]

SAVES = 500
#: Saves after which the listener gets SIGTERM, and after which the next one starts.
STOP_AT, RESTART_AT = 150, 300


async def collect(ws: ClientConnection, into: list[str], frames: list[dict[str, Any]]) -> None:
    """Read frames until cancelled: event ids into ``into``, anything else into ``frames``."""
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "event":
            into.append(frame["event"]["event_id"])
        else:
            frames.append(frame)


async def test_a_connected_client_gets_every_event_once_across_a_listener_restart(
    transactional_db: Any, use_bus: Any
) -> None:
    url = require_redis()
    bus = use_bus("redis")["BUS"]  # this process publishes there too
    env = stack_env(bus_url=url, bus_prefix=bus["channel_prefix"], layer_url=url, layer_backend="pubsub")
    cookie = await orm(lambda: session_cookie(make_user("admin", superuser=True)))
    stack = Stack(env)
    try:
        listener = stack.listener()
        daphne, port = stack.daphne()
        await asyncio.to_thread(wait_for_port, port, daphne)
        await asyncio.to_thread(listener.wait_for_output, "listening on")
        async with websocket(port, cookie) as ws:
            await subscribe(ws, "inventory:product")
            got: list[str] = []
            other: list[dict[str, Any]] = []
            reader = asyncio.create_task(collect(ws, got, other))
            restarted: Server | None = None
            try:
                for i in range(SAVES):
                    if i == STOP_AT:
                        listener.process.send_signal(signal.SIGTERM)  # saves go on while it stops
                    if i == RESTART_AT:
                        # Down until here: these events reach no browser live.
                        assert await asyncio.to_thread(listener.process.wait, 15) == 0
                        assert len(got) < RESTART_AT
                        restarted = stack.listener()  # catches up while the saves go on
                    await orm(lambda i=i: Product.objects.create(name=f"Lamp {i}", stock=i))  # type: ignore[misc]
                await wait_for(lambda: len(got) >= SAVES, 60, f"{SAVES} events not received")
                await asyncio.sleep(1.0)  # a duplicate would arrive in this time
            finally:
                reader.cancel()
        assert restarted is not None
        assert "listening on" in restarted.output()
    finally:
        stack.stop()
    rows = StoredEvent.objects.filter(topic="inventory:product").order_by("id")
    logged = await orm(lambda: list(rows.values_list("event_id", flat=True)))
    assert len(logged) == SAVES
    assert len(got) == len(set(got)), "an event reached the client twice"
    assert got == logged  # all of them, once, in log order
    assert other == []  # no error frame
