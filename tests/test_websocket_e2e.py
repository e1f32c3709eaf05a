"""End to end on real servers: daphne processes, ``manage.py eventbus_listen``, Redis, a websocket client.

The test process saves models (on the test database, shared with the servers);
the events travel over the Redis bus to the listener, which forwards them to the
channels-redis layer, which delivers them to the websocket consumers in two
daphne processes. Each client must see each event exactly once, and a client
that reconnects with ``since`` must get exactly the events it missed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from channels.db import database_sync_to_async as orm
from websockets.asyncio.client import ClientConnection

from django_eventbus.models import StoredEvent
from testproject.inventory.models import Order, Product
from tests.live_websocket import receive, subscribe, websocket
from tests.services import require_redis
from tests.websocket_support import REPO, Stack, make_user, session_cookie, stack_env, wait_for_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(params=["pubsub", "core"])
def layer_backend(request: pytest.FixtureRequest) -> str:
    """Both channels-redis layers: RedisPubSubChannelLayer and RedisChannelLayer."""
    return str(request.param)


@pytest.fixture
def servers(transactional_db: Any, use_bus: Any, layer_backend: str) -> Iterator[list[int]]:
    """Two daphne processes and one listener on a Redis bus and a channels-redis layer."""
    url = require_redis()
    bus = use_bus("redis")["BUS"]  # this process publishes there too
    env = stack_env(bus_url=url, bus_prefix=bus["channel_prefix"], layer_url=url, layer_backend=layer_backend)
    stack = Stack(env)
    try:
        listener = stack.listener()
        (first, first_port), (second, second_port) = stack.daphne(), stack.daphne()
        wait_for_port(first_port, first)
        wait_for_port(second_port, second)
        listener.wait_for_output("listening on")
        yield [first_port, second_port]
    finally:
        stack.stop()


@pytest.fixture
def cookie(transactional_db: Any) -> str:
    return session_cookie(make_user("admin", superuser=True))


async def events(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next ``count`` event frames, then proof that no further one (a duplicate) follows."""
    received = []
    for _ in range(count):
        frame = await receive(ws)
        assert frame["type"] == "event", frame
        received.append(frame["event"])
    with pytest.raises(asyncio.TimeoutError):
        extra = await receive(ws, timeout=1.0)
        pytest.fail(f"one event too many: {extra}")
    return received


# ORM calls from the async tests run in Django's sync thread; channels' wrapper closes
# that thread's connection afterwards (else the test database cannot be dropped).
create_product = orm(lambda name: Product.objects.create(name=name, stock=5))


def test_the_app_registers_the_forwarder_at_startup() -> None:
    """``apps.ready()`` wires Channels forwarding when a layer is configured (as eventbus_listen sees it)."""
    code = (
        "import django; django.setup()\n"
        "from django_eventbus.delivery.consumers import get_consumers\n"
        "print(sorted(c.name for c in get_consumers()))\n"
    )
    env = stack_env(bus_url="redis://127.0.0.1:6379/0", layer_url="redis://127.0.0.1:6379/0")
    output = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "django_eventbus.channels" in output


async def test_each_client_sees_each_event_once(servers: list[int], cookie: str) -> None:
    first_port, second_port = servers
    async with websocket(first_port, cookie) as first, websocket(second_port, cookie) as second:
        await subscribe(first, "inventory:*")
        await subscribe(first, "inventory:product")  # overlapping: still once
        await subscribe(second, "inventory:product")
        products = [await create_product(f"Lamp {i}") for i in range(5)]
        got_first = await events(first, 5)
        got_second = await events(second, 5)
    logged = await orm(
        lambda: list(
            StoredEvent.objects.filter(topic="inventory:product").order_by("id").values_list("event_id")
        )
    )()
    expected = [row[0] for row in logged]
    assert [e["event_id"] for e in got_first] == expected
    assert [e["event_id"] for e in got_second] == expected
    assert [e["payload"]["pk"] for e in got_first] == [p.pk for p in products]
    assert got_first[0]["payload"]["fields"]["name"] == "Lamp 0"
    assert {e["type"] for e in got_first} == {"created"}


async def test_a_client_that_reconnects_with_since_gets_exactly_what_it_missed(
    servers: list[int], cookie: str
) -> None:
    first_port, second_port = servers
    async with websocket(first_port, cookie) as ws:
        _, subscribed = await subscribe(ws, "inventory:product")
        await create_product("Seen")
        (seen,) = await events(ws, 1)
    # Disconnected: these happen while nobody listens.
    missed = [await create_product("Missed 1"), await create_product("Missed 2")]
    await orm(lambda: Order.objects.create(product=missed[0], quantity=1))()  # another topic
    await orm(lambda: Product.objects.filter(pk=missed[0].pk).update(stock=9))()  # bulk: an event too
    # Back, on the other server, resuming from the last event it saw.
    async with websocket(second_port, cookie) as ws:
        replayed, subscribed = await subscribe(ws, "inventory:product", since=seen["event_id"])
        assert [(e["type"], e["payload"]["fields"]["name"]) for e in replayed] == [
            ("created", "Missed 1"),
            ("created", "Missed 2"),
            ("updated", "Missed 1"),
        ]
        assert subscribed["replayed"] == 3
        assert subscribed["last_event_id"] == replayed[-1]["event_id"]
        live = await create_product("Live")
        (after,) = await events(ws, 1)
        assert after["payload"]["pk"] == live.pk


async def test_an_idle_socket_still_gets_events(servers: list[int], cookie: str) -> None:
    """Quiet for longer than redis-py 8's default 5 s socket timeout, then an event.

    RedisChannelLayer blocks 5 s in BZPOPMIN: with redis-py's defaults the read times
    out and the consumer dies (the socket closes). The testproject's layer settings
    (socket_timeout above the block) are what this checks.
    """
    async with websocket(servers[0], cookie) as ws:
        await subscribe(ws, "inventory:product")
        await asyncio.sleep(6.5)
        product = await create_product("After a pause")
        (event,) = await events(ws, 1)
        assert event["payload"]["pk"] == product.pk
