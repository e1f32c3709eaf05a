"""Django's psycopg pool (``OPTIONS={"pool": …}``) under the ASGI server and the listener.

With ``CONN_MAX_AGE=0`` every database hop of a websocket consumer opens a new
connection; with the pool, a daphne process and ``eventbus_listen`` share a fixed
number of connections however many sockets are open, and events still flow.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from channels.db import database_sync_to_async as orm
from django.db import connection
from websockets.asyncio.client import ClientConnection, connect

from testproject.inventory.models import Product
from tests.services import require_redis
from tests.websocket_support import Stack, make_user, session_cookie, stack_env, wait_for_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.pgdjango, pytest.mark.redis]

POOL = 3
SOCKETS = 40


@pytest.fixture
def pooled(use_bus: Any) -> Iterator[tuple[int, str]]:
    if connection.vendor != "postgresql":
        pytest.skip("Django's pool is PostgreSQL's (run with DATABASE_URL=postgres://…)")
    url = require_redis()
    bus = use_bus("redis")["BUS"]
    name = f"pooltest-{uuid.uuid4().hex[:8]}"
    env = stack_env(
        bus_url=url,
        bus_prefix=bus["channel_prefix"],
        layer_url=url,
        extra={"DATABASE_POOL": str(POOL), "DATABASE_APPLICATION_NAME": name},
    )
    stack = Stack(env)
    try:
        listener = stack.listener()
        server, port = stack.daphne()
        wait_for_port(port, server)
        listener.wait_for_output("listening on")
        yield port, name
    finally:
        stack.stop()


def server_connections(application_name: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [application_name]
        )
        (count,) = cursor.fetchone()
    return int(count)


async def open_socket(port: int, cookie: str) -> ClientConnection:
    ws = await connect(
        f"ws://127.0.0.1:{port}/ws/events/",
        origin=f"http://127.0.0.1:{port}",  # type: ignore[arg-type]
        additional_headers={"Cookie": f"sessionid={cookie}"},
        open_timeout=30,
    )
    await ws.send(json.dumps({"type": "subscribe", "topic": "inventory:product", "since": ""}))
    return ws


async def frames_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] != kind:
        frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    return frames


async def test_many_sockets_share_the_pool_and_events_still_flow(pooled: tuple[int, str]) -> None:
    port, application_name = pooled
    # Four users, ten sockets each: under the per-user connection limit (20 by default).
    cookies = [
        await orm(lambda i=i: session_cookie(make_user(f"admin{i}", superuser=True)))() for i in range(4)
    ]
    await orm(lambda: Product.objects.create(name="before", stock=1))()
    sockets = await asyncio.gather(*(open_socket(port, cookies[i % 4]) for i in range(SOCKETS)))
    try:
        # Each socket's session lookup and replay went through the database.
        for ws in sockets:
            frames = await frames_until(ws, "subscribed")
            assert [f["event"]["payload"]["fields"]["name"] for f in frames[:-1]] == ["before"]
        # Two processes (daphne, eventbus_listen), each at most POOL connections.
        assert 1 <= await orm(server_connections)(application_name) <= 2 * POOL
        await orm(lambda: Product.objects.create(name="live", stock=1))()
        for ws in sockets:
            (frame,) = await frames_until(ws, "event")
            assert frame["event"]["payload"]["fields"]["name"] == "live"
        assert await orm(server_connections)(application_name) <= 2 * POOL
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
