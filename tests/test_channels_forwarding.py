"""Forwarding events to channel layers: registration, messages, and event loops.

The forwarder runs on the bus's own loop (the runner thread in the web process,
or eventbus_listen's loop), never on the ASGI server's loop. These tests run it
from another thread on purpose: that is where the in-memory layer breaks without
the bridge, and what channels-redis must support.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import connections

from django_eventbus.channels import CONSUMER_NAME, MESSAGE_TYPE, enabled, setup
from django_eventbus.channels.forwarding import forward, note_server_loop, skip_backlog
from django_eventbus.channels.groups import ALL_GROUP, group_name, subscription_group
from django_eventbus.delivery.consumers import get_consumers, unregister
from django_eventbus.delivery.listener import ConsumerRunner
from django_eventbus.events import Event, EventType
from django_eventbus.models import ConsumerCursor, StoredEvent
from tests.orm import orm
from tests.services import require_redis
from tests.websocket_support import make_user, with_user

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


def redis_layers(kind: str) -> dict[str, Any]:
    url = require_redis()
    prefix = f"t{uuid.uuid4().hex[:8]}"  # tests of other runs share this Redis
    if kind == "pubsub":
        return {
            "default": {
                "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                "CONFIG": {"hosts": [url], "prefix": prefix},
            }
        }
    return {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{"address": url, "socket_timeout": 10, "max_connections": 10_000}],
                "prefix": prefix,
                "capacity": 1000,
            },
        }
    }


def event(topic: str = "inventory:product", **payload: Any) -> Event:
    return Event(type=EventType.CREATED, topic=topic, payload=payload)


@pytest.fixture
def registered() -> Iterator[None]:
    setup()
    yield
    setup()  # back to what the settings say


def forward_from_another_thread(item: Event, layer: Any = None) -> None:
    """Run ``forward`` on a loop of its own in a new thread, like the bus runner does."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(forward(item, layer))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


# -- registration ---------------------------------------------------------------------------------


def test_setup_registers_a_durable_catch_all_consumer(settings: Any, registered: None) -> None:
    settings.CHANNEL_LAYERS = IN_MEMORY
    setup()
    consumer = {c.name: c for c in get_consumers()}[CONSUMER_NAME]
    assert consumer.pattern == "*"
    assert consumer.durable  # a restarted listener resumes from its cursor
    assert consumer.is_async
    assert consumer.skip_backlog is not None
    settings.EVENTBUS = {**settings.EVENTBUS, "STORE_EVENTS": False}  # setting_changed re-runs setup()
    assert not {c.name: c for c in get_consumers()}[CONSUMER_NAME].durable  # no log to resume from


def test_setup_follows_the_settings(settings: Any, registered: None) -> None:
    settings.CHANNEL_LAYERS = IN_MEMORY
    setup()
    assert enabled()
    settings.EVENTBUS = {**settings.EVENTBUS, "CHANNELS": False}  # setting_changed re-runs setup()
    assert not enabled()
    assert CONSUMER_NAME not in {c.name for c in get_consumers()}
    settings.EVENTBUS = {**settings.EVENTBUS, "CHANNELS": True}
    assert CONSUMER_NAME in {c.name for c in get_consumers()}
    settings.CHANNEL_LAYERS = {}
    assert CONSUMER_NAME not in {c.name for c in get_consumers()}


def test_checks(settings: Any) -> None:
    from django_eventbus.channels.checks import check_channels

    settings.CHANNEL_LAYERS = IN_MEMORY
    settings.EVENTBUS = {**settings.EVENTBUS, "BUS": "memory://"}
    assert check_channels() == []
    settings.EVENTBUS = {**settings.EVENTBUS, "BUS": "redis://127.0.0.1:6379/0"}
    assert [m.id for m in check_channels()] == ["django_eventbus.W101"]
    settings.EVENTBUS = {
        **settings.EVENTBUS,
        "BUS": "memory://",
        "WEBSOCKET_AUTHORIZE": "no.such.function",
        "WEBSOCKET_MAX_SUBSCRIPTIONS": 0,
    }
    assert sorted(str(m.id) for m in check_channels()) == ["django_eventbus.E101", "django_eventbus.E102"]
    settings.EVENTBUS = {
        **settings.EVENTBUS,
        "WEBSOCKET_AUTHORIZE": "django_eventbus.channels.auth.default_authorize",
        "WEBSOCKET_MAX_SUBSCRIPTIONS": 32,
        "CHANNELS_RESUME_LIMIT": None,  # None turns a resume limit off
        "CHANNELS_RESUME_MAX_AGE": None,
    }
    assert check_channels() == []
    for key, bad in (("CHANNELS_RESUME_LIMIT", 0), ("CHANNELS_RESUME_MAX_AGE", "5 minutes")):
        settings.EVENTBUS = {**settings.EVENTBUS, key: bad}
        assert [m.id for m in check_channels()] == ["django_eventbus.E102"]
        settings.EVENTBUS = {**settings.EVENTBUS, key: None}


async def test_disabled_forwarding_sends_nothing(settings: Any) -> None:
    settings.CHANNEL_LAYERS = IN_MEMORY
    settings.EVENTBUS = {**settings.EVENTBUS, "CHANNELS": False}
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(ALL_GROUP, channel)
    note_server_loop(asyncio.get_running_loop())
    await forward(event())
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 0.2)


# -- messages --------------------------------------------------------------------------------------


async def test_each_group_of_the_topic_gets_the_message(settings: Any) -> None:
    settings.CHANNEL_LAYERS = IN_MEMORY
    layer = get_channel_layer()
    note_server_loop(asyncio.get_running_loop())
    channels = {}
    for group in (group_name("inventory:product"), subscription_group("inventory:*"), ALL_GROUP):
        channels[group] = await layer.new_channel()
        await layer.group_add(group, channels[group])
    unrelated = await layer.new_channel()
    await layer.group_add(group_name("inventory:order"), unrelated)
    sent = event(name="Lamp")
    await forward(sent)
    for channel in channels.values():
        message = await asyncio.wait_for(layer.receive(channel), 1)
        assert message == {"type": MESSAGE_TYPE, "event": sent.to_dict()}
        assert Event.from_dict(message["event"]) == sent
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(unrelated), 0.2)


# -- event loops ---------------------------------------------------------------------------------


class RecordingLayer(InMemoryChannelLayer):  # type: ignore[misc]
    """An in-memory layer that notes the loop each ``group_send`` runs on."""

    loops: list[asyncio.AbstractEventLoop] = []

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        self.loops.append(asyncio.get_running_loop())
        await super().group_send(group, message)


async def test_in_memory_layer_from_another_thread_is_bridged_to_the_server_loop(settings: Any) -> None:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "tests.test_channels_forwarding.RecordingLayer"}}
    loop = asyncio.get_running_loop()
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group_name("inventory:product"), channel)
    note_server_loop(loop)  # what EventsConsumer.connect() does
    RecordingLayer.loops = []
    sent = event()
    await loop.run_in_executor(None, forward_from_another_thread, sent)
    # Every group_send ran on this (the server's) loop, not on the forwarder's: the
    # layer's queues and their waiters' futures belong to this loop. (Completing a
    # waiter from another thread leaves the receiving consumer asleep for good.)
    assert RecordingLayer.loops and all(used is loop for used in RecordingLayer.loops)
    message = await asyncio.wait_for(layer.receive(channel), 1)
    assert message["event"]["event_id"] == sent.event_id


async def test_in_memory_without_a_server_loop_is_a_no_op(settings: Any) -> None:
    settings.CHANNEL_LAYERS = IN_MEMORY
    import django_eventbus.channels.forwarding as forwarding

    forwarding._server_loop = None
    await asyncio.get_running_loop().run_in_executor(None, forward_from_another_thread, event())


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["pubsub", "core"])
async def test_redis_layers_take_events_from_another_loop(settings: Any, kind: str) -> None:
    settings.CHANNEL_LAYERS = redis_layers(kind)
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(subscription_group("inventory:*"), channel)
    try:
        sent = [event(n=i) for i in range(20)]
        for item in sent:
            # The forwarder's loop differs from the receiver's: channels-redis keeps a
            # connection pool per loop, so this is safe (no bridge needed).
            await asyncio.get_running_loop().run_in_executor(None, forward_from_another_thread, item)
        received = [await asyncio.wait_for(layer.receive(channel), 5) for _ in sent]
        assert [m["event"]["event_id"] for m in received] == [e.event_id for e in sent]
        assert Event.from_dict(received[0]["event"]) == sent[0]
    finally:
        await layer.group_discard(subscription_group("inventory:*"), channel)
        await layer.flush() if kind == "core" else None


# -- the web process on the memory bus, end to end ---------------------------------------------------


@pytest.fixture
async def memory_mode(settings: Any, use_bus: Any) -> AsyncIterator[None]:
    """The demo's configuration: memory bus, in-memory layer, consumers on the runner thread."""
    from django_eventbus.delivery.runtime import reset_runner

    settings.CHANNEL_LAYERS = IN_MEMORY
    use_bus("memory")
    setup()
    # The runner subscribes the registered consumers when it builds its bus: a new one.
    # (In a plain thread: closing the runner waits for Django's sync thread.)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, reset_runner)
    yield
    await loop.run_in_executor(None, reset_runner)
    unregister(CONSUMER_NAME)
    setup()


@pytest.mark.django_db(transaction=True)
async def test_model_save_reaches_a_websocket_in_memory_mode(memory_mode: None) -> None:
    from testproject.inventory.models import Product

    admin = await database_sync_to_async(make_user)("admin", superuser=True)
    ws = WebsocketCommunicator(with_user(admin), "/ws/events/")
    assert (await ws.connect())[0]
    try:
        await ws.send_json_to({"type": "subscribe", "topic": "inventory:*"})
        assert (await ws.receive_json_from())["type"] == "subscribed"
        product = await database_sync_to_async(Product.objects.create)(name="Lamp", stock=4)
        frame = await ws.receive_json_from(timeout=5)
        assert frame["type"] == "event"
        assert frame["event"]["topic"] == "inventory:product"
        assert frame["event"]["type"] == "created"
        assert frame["event"]["payload"]["pk"] == product.pk
        assert frame["event"]["payload"]["fields"]["name"] == "Lamp"
        # Delivered once: the runner thread forwarded it, through the bridge, to this loop.
        assert await ws.receive_nothing(timeout=0.3)
    finally:
        await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_reset_runner_from_djangos_sync_thread_does_not_deadlock(memory_mode: None) -> None:
    """The runner's consumers use their own database thread, not the caller's (asgiref's) one."""
    from asgiref.sync import sync_to_async

    from django_eventbus.delivery.runtime import get_runner, reset_runner
    from testproject.inventory.models import Product

    await sync_to_async(Product.objects.create)(name="Lamp", stock=1)  # consumers ran on the runner
    await sync_to_async(get_runner().flush)()
    start = asyncio.get_running_loop().time()
    await asyncio.wait_for(sync_to_async(reset_runner)(), timeout=8)
    assert asyncio.get_running_loop().time() - start < 3


# -- resuming after a restart ---------------------------------------------------------------------


def log_events(count: int, age: float = 0.0) -> list[Event]:
    """``count`` events written to the log (stamped ``age`` seconds ago), as a writer commits them."""
    from django.db import connection, transaction

    from django_eventbus.capture.store import record

    stamp = datetime.now(timezone.utc) - timedelta(seconds=age)
    events = [
        Event(type=EventType.CREATED, topic="inventory:product", payload={"n": i}, timestamp=stamp)
        for i in range(count)
    ]
    with transaction.atomic():
        record(events, connection)
    return events


def forwarder_runner() -> ConsumerRunner:
    """The forwarder as a fresh listener process runs it: its cursor from the database."""
    consumer = {c.name: c for c in get_consumers()}[CONSUMER_NAME]
    return ConsumerRunner(consumer, persist=True)


async def owned_forwarder() -> ConsumerRunner:
    """A fresh listener process's forwarder once it owns the lease (it loads the cursor)."""
    runner = forwarder_runner()
    await runner.prepare()  # a new consumer's cursor row, at the end of the log
    assert await runner.acquire()
    return runner


@pytest.fixture
async def all_group(settings: Any, registered: None) -> AsyncIterator[tuple[Any, str]]:
    """An in-memory layer (served on this loop) with a channel in the group of every event."""
    settings.CHANNEL_LAYERS = IN_MEMORY
    layer = get_channel_layer()
    note_server_loop(asyncio.get_running_loop())
    channel = await layer.new_channel()
    await layer.group_add(ALL_GROUP, channel)
    yield layer, channel
    await layer.group_discard(ALL_GROUP, channel)
    # The runners' ORM calls ran in asgiref's database thread: close its connection, or
    # the test database cannot be dropped (Listener.stop() does the same).
    await sync_to_async(connections.close_all)()


async def received(layer: Any, channel: str) -> list[str]:
    """Event ids of the messages waiting on ``channel``."""
    ids: list[str] = []
    while True:
        try:
            message = await asyncio.wait_for(layer.receive(channel), 0.2)
        except asyncio.TimeoutError:
            return ids
        ids.append(message["event"]["event_id"])


@pytest.mark.django_db(transaction=True)
async def test_a_restarted_forwarder_sends_what_it_missed_in_log_order(all_group: tuple[Any, str]) -> None:
    layer, channel = all_group
    await orm(lambda: log_events(3))  # history before the first start: not replayed
    first = await owned_forwarder()
    assert await first.catch_up() == 0
    assert await received(layer, channel) == []
    await first.release()  # the listener stops
    # The listener is down while these commit; the next one resumes from the cursor.
    missed = await orm(lambda: log_events(5))
    restarted = await owned_forwarder()
    assert await restarted.catch_up() == 5
    assert await received(layer, channel) == [e.event_id for e in missed]
    await restarted.release()
    again = await owned_forwarder()
    assert await again.catch_up() == 0  # the cursor was saved at the end of the replay
    await again.release()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("limits", "age"),
    [({"CHANNELS_RESUME_LIMIT": 4}, 0.0), ({"CHANNELS_RESUME_MAX_AGE": 60}, 120.0)],
    ids=["too-many", "too-old"],
)
async def test_a_long_backlog_is_skipped_not_replayed(
    all_group: tuple[Any, str],
    settings: Any,
    caplog: pytest.LogCaptureFixture,
    limits: dict[str, Any],
    age: float,
) -> None:
    layer, channel = all_group
    settings.EVENTBUS = {**settings.EVENTBUS, **limits}
    first = await owned_forwarder()
    await first.release()
    await orm(lambda: log_events(5, age=age))
    restarted = await owned_forwarder()
    with caplog.at_level(logging.WARNING, logger="django_eventbus"):
        assert await restarted.catch_up() == 0
    assert await received(layer, channel) == []
    assert any("skipped its backlog" in r.getMessage() for r in caplog.records)
    last = await orm(lambda: StoredEvent.objects.order_by("-id").values_list("id", flat=True).first())
    cursor = await orm(lambda: ConsumerCursor.objects.get(name=CONSUMER_NAME))
    assert cursor.position == last
    # From there on, events are forwarded as usual.
    after = await orm(lambda: log_events(2))
    assert await restarted.catch_up() == 2
    assert await received(layer, channel) == [e.event_id for e in after]


@pytest.mark.django_db(transaction=True)
def test_skip_backlog_counts_only_what_is_waiting(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "CHANNELS_RESUME_LIMIT": 3}
    log_events(4)
    first, last = (
        StoredEvent.objects.order_by(order).values_list("id", flat=True).first() for order in ("id", "-id")
    )
    assert first is not None and last is not None
    before = first - 1
    assert skip_backlog(before, handled=0)  # 4 waiting > 3
    assert not skip_backlog(before, handled=1)  # one was forwarded live already: 3 waiting
    assert not skip_backlog(first, handled=0)
    settings.EVENTBUS = {**settings.EVENTBUS, "CHANNELS_RESUME_LIMIT": None}
    assert not skip_backlog(before, handled=0)
    log_events(1, age=10_000)  # old, but after younger rows: only the oldest waiting row's age counts
    assert not skip_backlog(before, handled=0)
    settings.EVENTBUS = {**settings.EVENTBUS, "CHANNELS_RESUME_MAX_AGE": 10}
    assert skip_backlog(last, handled=0)
    settings.EVENTBUS = {**settings.EVENTBUS, "CHANNELS_RESUME_MAX_AGE": None}
    assert not skip_backlog(last, handled=0)
