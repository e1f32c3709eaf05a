"""The commit boundary: log rows in the caller's transaction, publishing after commit, any size.

The 100,000-event cases take minutes on a small machine: they run when
``EVENTBUS_TEST_100K=1`` (``scripts/test`` runs them once); the default run has
the same tests at 20,000 events.
"""

from __future__ import annotations

import os
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction

from django_eventbus.capture.outbox import emit, on_commit_state
from django_eventbus.capture.publishing import make_event
from django_eventbus.conf import conf
from django_eventbus.delivery.consumers import Consumer
from django_eventbus.delivery.listener import Listener
from django_eventbus.delivery.relay import Relay, is_wake_callback
from django_eventbus.events import Event, create_event_bus
from django_eventbus.events.base import BaseEventBus
from django_eventbus.models import StoredEvent
from django_eventbus.testing import capture_events
from testproject.inventory.models import Product
from tests.orm import orm
from tests.polling import await_until

pytestmark = pytest.mark.django_db(transaction=True)

HUGE = pytest.param(
    100_000,
    marks=[
        pytest.mark.slow,
        pytest.mark.timeout(900),
        pytest.mark.skipif(
            os.environ.get("EVENTBUS_TEST_100K") != "1", reason="set EVENTBUS_TEST_100K=1 (scripts/test does)"
        ),
    ],
)


def names(events: list[Event]) -> list[str]:
    return [e.payload["fields"]["name"] for e in events]


# -- the on_commit adapter ---------------------------------------------------------------


def test_the_adapter_reads_this_djangos_savepoint_levels() -> None:
    assert on_commit_state(connection) is None or not connection.in_atomic_block
    with transaction.atomic():
        state = on_commit_state(connection)
        assert state is not None, "this Django lacks savepoint_ids/run_on_commit: the fallback is in use"
        assert state[0] == frozenset() and list(state[1]) == []
        transaction.on_commit(lambda: None)
        with transaction.atomic():
            state = on_commit_state(connection)
            assert state is not None
            level, pending = state
            assert len(level) == 1 and [sids for sids, _ in pending] == [frozenset()]


def test_one_callback_per_savepoint_level_not_per_event() -> None:
    with capture_events("inventory:*") as events:
        with transaction.atomic():
            for i in range(50):
                Product.objects.create(name=f"a{i}")
            with transaction.atomic():
                Product.objects.create(name="inner")
            Product.objects.create(name="after")
            callbacks = len(connection.run_on_commit)
        events.wait_for(52)
    assert callbacks == 3  # outer, savepoint, outer again (so the order is kept)
    assert names(events) == [f"a{i}" for i in range(50)] + ["inner", "after"]


def test_without_the_adapter_each_emit_gets_its_own_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Django without the attributes the adapter reads: the public API alone still works.
    monkeypatch.setattr("django_eventbus.capture.outbox.on_commit_state", lambda connection: None)
    with capture_events("inventory:*") as events:
        with transaction.atomic():
            Product.objects.create(name="kept")
            with pytest.raises(RuntimeError), transaction.atomic():
                Product.objects.create(name="rolled back")
                raise RuntimeError
            Product.objects.create(name="kept too")
            callbacks = len(connection.run_on_commit)
        events.wait_for(2)
    assert callbacks == 2  # the rolled back savepoint's callback is gone
    assert names(events) == ["kept", "kept too"]
    assert StoredEvent.objects.count() == 2


# -- bounded memory: the buffer and the relay -----------------------------------------------


def test_events_over_the_buffer_are_relayed_in_order_and_savepoints_still_discard(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "BUS": "memory://", "PUBLISH_BUFFER": 5}
    with capture_events("inventory:*") as events:
        with transaction.atomic():
            for i in range(4):
                Product.objects.create(name=f"b{i}")
            with pytest.raises(RuntimeError), transaction.atomic():
                for i in range(4):
                    Product.objects.create(name=f"gone{i}")  # one buffered, three relay rows
                raise RuntimeError
            for i in range(4, 12):
                Product.objects.create(name=f"b{i}")
            pending = on_commit_state(connection)
            assert pending is not None
            assert sum(is_wake_callback(func) for _, func in pending[1]) == 1  # one wake, outer level
        events.wait_for(12)
    assert names(events) == [f"b{i}" for i in range(12)]
    assert StoredEvent.objects.count() == 12
    assert StoredEvent.objects.filter(relay=True).count() == 8  # the buffer filled at the fifth event


def test_without_the_log_everything_is_buffered(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "BUS": "memory://", "PUBLISH_BUFFER": 2, "STORE_EVENTS": False}
    with capture_events("inventory:*") as events:
        with transaction.atomic():
            for i in range(5):
                Product.objects.create(name=f"c{i}")
        events.wait_for(5)
    assert names(events) == [f"c{i}" for i in range(5)]
    assert not StoredEvent.objects.exists()


def test_autocommit_emits_over_the_buffer_are_relayed_too(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "BUS": "memory://", "PUBLISH_BUFFER": 3}
    batch = [make_event("ops:bulk", payload={"i": i}) for i in range(10)]
    with capture_events("ops:*") as events:
        emit(batch)  # no transaction: the rows get one of their own
        events.wait_for(10)
    assert [e.event_id for e in events] == [e.event_id for e in batch]
    assert StoredEvent.objects.filter(relay=True).count() == 7


@pytest.mark.pgdjango
def test_1700_creates_in_one_transaction_commit_on_the_postgres_bus_of_djangos_database(
    use_bus: Any,
) -> None:
    # In-transaction NOTIFYs in one SELECT failed here: "target lists can have at most 1664 entries".
    use_bus("postgres-django")
    with capture_events("inventory:*") as events:
        with transaction.atomic():
            for i in range(1700):
                Product.objects.create(name=f"n{i}")
        events.wait_for(1700, timeout=30)
    assert len({e.event_id for e in events}) == 1700
    assert StoredEvent.objects.count() == 1700


# -- any transaction size, on both buses, to a durable consumer ----------------------------


def write_one_transaction(how: str, n: int) -> None:
    with transaction.atomic():
        if how == "creates":
            for i in range(n):
                Product.objects.create(name=f"s{i}", stock=i)
        else:
            # The documented bulk API: Product.objects is an EventBusManager.
            Product.objects.bulk_create([Product(name=f"s{i}", stock=i) for i in range(n)], batch_size=2000)


@pytest.mark.pgdjango
@pytest.mark.parametrize("kind", ["postgres-django", "redis"])
@pytest.mark.parametrize("how", ["creates", "bulk_create"])
@pytest.mark.parametrize("n", [20_000, HUGE])
async def test_one_transaction_of_n_events_commits_and_a_durable_consumer_gets_each_once(
    kind: str, how: str, n: int, use_bus: Any
) -> None:
    use_bus(kind)
    bus: BaseEventBus = create_event_bus(conf.bus_config())  # type: ignore[assignment]
    await bus.connect()
    handled: list[Event] = []

    async def take(event: Event) -> None:
        handled.append(event)

    consumer = Consumer(
        name=f"test.scale.{uuid.uuid4().hex[:6]}", pattern="inventory:*", func=take, checkpoint_every=1000
    )
    listener = Listener(bus, [consumer], interval=0.5)
    relay = Relay(bus)
    await listener.start()
    await relay.start()
    try:
        await orm(lambda: write_one_transaction(how, n))
        await await_until(lambda: len(handled) >= n, timeout=300, what=f"{n} events handled")
        # Catch-up may reach the relay rows in the log before the relay has published them all.
        published = max(0, n - conf.PUBLISH_BUFFER)
        await await_until(lambda: relay.published >= published, timeout=120, what="relay rows published")
        await relay.stop()
        await listener.stop()
    finally:
        await relay.stop()
        await listener.stop()
        await bus.close()
    assert len(handled) == n
    assert len({e.event_id for e in handled}) == n
    buffer = conf.PUBLISH_BUFFER
    assert await orm(lambda: StoredEvent.objects.count()) == n
    assert await orm(lambda: StoredEvent.objects.filter(relay=True).count()) == max(0, n - buffer)
    assert relay.published == max(0, n - buffer)


def peak_memory(work: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.pgdjango
@pytest.mark.parametrize(
    ("small", "large"), [(1_000, 5_000), pytest.param(20_000, 100_000, marks=HUGE.marks)]
)
def test_the_writers_memory_does_not_grow_with_the_transaction(
    small: int, large: int, use_bus: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    use_bus("postgres-django", PUBLISH_BUFFER=500)
    peaks = {n: peak_memory(lambda n=n: write_one_transaction("creates", n)) for n in (small, large)}  # type: ignore[misc]
    with capsys.disabled():
        print(f"\nwriter peak (tracemalloc), PUBLISH_BUFFER=500: {peaks}")
    # Five times the events, not five times the memory: only the buffer is kept.
    assert peaks[large] < peaks[small] * 1.5, peaks
    assert StoredEvent.objects.count() == small + large


async def test_a_started_relay_publishes_rows_written_without_a_wake() -> None:
    # PostgreSQL: the exclusive relay's poll; SQLite: the polling relay (one listener assumed).
    bus: BaseEventBus = create_event_bus("memory://")  # type: ignore[assignment]
    await bus.connect()
    got: list[Event] = []
    await bus.subscribe("ops:*", got.append, pattern="ops:*")
    relay = Relay(bus, interval=0.05)
    await relay.start()
    try:
        events = [make_event("ops:polled", payload={"i": i}) for i in range(3)]
        await orm(lambda: [StoredEvent.from_event(e, relay=True).save() for e in events])  # type: ignore[func-returns-value]
        await await_until(lambda: len(got) >= 3, timeout=10, what="polled rows published")
    finally:
        await relay.stop()
        await bus.close()
    assert [e.event_id for e in got] == [e.event_id for e in events]
