"""The relay publishes the log rows no writer published (relay = true), in log order, once.

Rows are written here by a plain psycopg connection, like a writer outside Django
(or a database trigger) would; the relay publishes them on a real bus.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from django.db import connection, transaction

from django_eventbus.capture.publishing import make_event, publish
from django_eventbus.conf import django_database_conninfo
from django_eventbus.delivery.relay import WAKE_CHANNEL, Relay, wake_relay
from django_eventbus.events import Event, create_event_bus
from django_eventbus.events.base import BaseEventBus
from django_eventbus.models import StoredEvent
from tests.listener_processes import bus_env, start_listener
from tests.orm import orm
from tests.polling import await_until
from tests.services import bus_setting

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

INSERT = (
    "INSERT INTO django_eventbus_event"
    " (event_id, type, topic, payload, timestamp, source, correlation_id, metadata, relay)"
    " VALUES (%s, 'custom', %s, %s::jsonb, now(), 'psql', NULL, '{}'::jsonb, true)"
)


@pytest.fixture(autouse=True)
def _django_on_postgres() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the relay's PostgreSQL tests need the Django database on PostgreSQL")


@pytest.fixture
async def bus() -> AsyncIterator[BaseEventBus]:
    created: BaseEventBus = create_event_bus(bus_setting("postgres"))  # type: ignore[assignment]
    await created.connect()
    yield created
    await created.close()


class Received:
    """What a bus subscriber got, topic by topic."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def topics(self) -> list[str]:
        return [e.topic for e in self.events]


async def subscribe(bus: BaseEventBus) -> Received:
    received = Received()
    await bus.subscribe("ext:*", received, pattern="ext:*")
    return received


def insert(*batches: list[str]) -> None:
    """Each list of topics in its own transaction, from a connection with no Django in it."""
    with psycopg.connect(django_database_conninfo("default")) as conn:
        for topics in batches:
            with conn.transaction():
                for topic in topics:
                    conn.execute(INSERT, [uuid.uuid4().hex, topic, '{"n": 1}'])


async def started(*relays: Relay) -> None:
    for relay in relays:
        await relay.start()
    await await_until(lambda: any(r.active for r in relays), timeout=10, what="a relay active")


async def test_rows_from_a_plain_connection_are_published_in_log_order(bus: BaseEventBus) -> None:
    received = await subscribe(bus)
    relay = Relay(bus, interval=0.05)
    await started(relay)
    try:
        topics = [f"ext:{i}" for i in range(60)]
        await asyncio.to_thread(insert, topics[:25], topics[25:26], topics[26:])
        await await_until(lambda: len(received.events) >= 60, timeout=15, what="60 relayed events")
    finally:
        await relay.stop()
    assert received.topics == topics
    cursor = await orm(lambda: StoredEvent.objects.filter(relay=True).order_by("-id").first())
    assert cursor is not None and relay.position == cursor.id


async def test_rolled_back_rows_are_never_published(bus: BaseEventBus, settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "BUS": "memory://", "GAP_TIMEOUT": 0.5, "PUBLISH_BUFFER": 0}
    received = await subscribe(bus)

    def rolled_back() -> None:
        conninfo = django_database_conninfo("default")
        with psycopg.connect(conninfo) as conn, conn.transaction(force_rollback=True):
            conn.execute(INSERT, [uuid.uuid4().hex, "ext:phantom", "{}"])
        # The Django writer too: every event over the (zero) buffer is a relay row.
        with pytest.raises(RuntimeError), transaction.atomic():
            publish("ext:phantom-django", make_event("ext:phantom-django"))
            raise RuntimeError

    relay = Relay(bus, interval=0.05)
    await started(relay)
    try:
        await orm(rolled_back)
        await asyncio.to_thread(insert, ["ext:real"])
        # Ids of rolled back rows stay missing: the relay waits GAP_TIMEOUT, then goes on.
        await await_until(lambda: len(received.events) >= 1, timeout=15, what="the committed row")
        assert await orm(lambda: StoredEvent.objects.count()) == 1
    finally:
        await relay.stop()
    assert received.topics == ["ext:real"]


async def test_an_uncommitted_lower_id_holds_the_relay_back_so_order_is_kept(bus: BaseEventBus) -> None:
    received = await subscribe(bus)
    relay = Relay(bus)  # not started: passes are run by hand below
    conninfo = django_database_conninfo("default")
    try:
        await asyncio.to_thread(insert, ["ext:before"])
        assert await relay.publish_pending() == 1  # the relay's cursor is set from here on
        async with await psycopg.AsyncConnection.connect(conninfo) as slow:
            await slow.execute(INSERT, [uuid.uuid4().hex, "ext:first", "{}"])  # id n, not committed
            await asyncio.to_thread(insert, ["ext:second"])  # id n+1, committed
            assert await relay.publish_pending() == 0  # ext:first may still commit: wait for it
            await slow.commit()
        assert await relay.publish_pending() == 2
        await await_until(lambda: len(received.events) >= 3, timeout=10, what="all events")
    finally:
        await relay.stop()
    assert received.topics == ["ext:before", "ext:first", "ext:second"]


async def test_two_relays_publish_each_row_once_and_a_standby_takes_over(bus: BaseEventBus) -> None:
    received = await subscribe(bus)
    relays = [Relay(bus, interval=0.05), Relay(bus, interval=0.05)]
    await started(*relays)
    try:
        assert sum(r.active for r in relays) == 1
        first = [f"ext:a{i}" for i in range(100)]
        await asyncio.to_thread(insert, *[first[i : i + 10] for i in range(0, 100, 10)])
        await await_until(lambda: len(received.events) >= 100, timeout=15, what="100 events")
        # The active relay's session ends (a crash or a deploy): the standby takes over.
        holder = next(r for r in relays if r.active)
        standby = next(r for r in relays if r is not holder)
        await holder.stop()
        await await_until(lambda: standby.active, timeout=10, what="the standby taking over")
        second = [f"ext:b{i}" for i in range(50)]
        await asyncio.to_thread(insert, second)
        await await_until(lambda: len(received.events) >= 150, timeout=15, what="150 events")
    finally:
        for relay in relays:
            await relay.stop()
    assert received.topics == first + second  # each once, in log order
    assert len({e.event_id for e in received.events}) == 150


async def test_a_wake_after_commit_beats_a_long_poll_interval(bus: BaseEventBus, settings: Any) -> None:
    received = await subscribe(bus)
    relay = Relay(bus, interval=60.0)
    await started(relay)
    await relay.publish_pending()  # whatever the first pass found is done: now it waits
    try:
        start = time.monotonic()
        await asyncio.to_thread(insert, ["ext:woken"])
        # What a writer that left relay rows does after its commit (the outbox does it).
        settings.EVENTBUS = {**settings.EVENTBUS, "BUS": bus_setting("postgres")}
        await orm(wake_relay)
        await await_until(lambda: len(received.events) >= 1, timeout=10, what="the woken relay")
        elapsed = time.monotonic() - start
    finally:
        await relay.stop()
    assert elapsed < 5.0, elapsed  # the poll would take 60 s
    assert received.topics == ["ext:woken"]


async def test_wake_relay_sends_its_notify_outside_any_transaction(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "BUS": bus_setting("postgres")}
    conninfo = django_database_conninfo("default")
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as listener:
        await listener.execute(f"LISTEN {WAKE_CHANNEL}")
        await orm(wake_relay)
        got = [n.payload async for n in listener.notifies(timeout=5, stop_after=1)]
    assert got == ["default"]


async def test_eventbus_listen_runs_the_relay(tmp_path: Any) -> None:
    s = connection.settings_dict
    database = (
        f"postgres://{s['USER'] or 'postgres'}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    )
    prefix = f"r{uuid.uuid4().hex[:10]}"
    bus: BaseEventBus = create_event_bus(  # type: ignore[assignment]
        {
            "backend": "postgres",
            "connection_string": django_database_conninfo("default"),
            "channel_prefix": prefix,
        }
    )
    await bus.connect()
    received = await subscribe(bus)
    process = await asyncio.to_thread(start_listener, bus_env("postgres", prefix), tmp_path / "rec", database)
    try:
        await asyncio.to_thread(insert, ["ext:from-outside", "ext:django-free"])
        await await_until(lambda: len(received.events) >= 2, timeout=20, what="events relayed by the command")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        await bus.close()
    assert received.topics == ["ext:from-outside", "ext:django-free"]
