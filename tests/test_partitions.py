"""Partitioned consumers: N leases and cursors per consumer, a fair share per listener, per-key order.

The process tests run real ``manage.py eventbus_listen`` processes sharing the PostgreSQL test
database, on both buses, like tests/test_leases.py.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import run_checks
from django.db import connections
from django.test import override_settings

from django_eventbus.delivery import leases
from django_eventbus.delivery.consumers import Consumer, register
from django_eventbus.delivery.listener import Listener
from django_eventbus.delivery.partitions import cursor_name, partition_of, row_key
from django_eventbus.events import Event, EventType, create_event_bus
from django_eventbus.models import ConsumerCursor, ConsumerMember, StoredEvent
from testproject.inventory.models import Product
from tests.listener_processes import env_of_current_bus as _env_of_current_bus
from tests.listener_processes import start_listener
from tests.orm import orm
from tests.polling import await_until, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def model_event(topic: str, pk: Any) -> Event:
    return Event(type=EventType.UPDATED, topic=topic, payload={"model": topic, "pk": pk, "fields": {}})


# -- the key and the hash -------------------------------------------------------------------


def test_partition_is_crc32_of_the_key_json_and_the_default_key_is_the_row_or_topic() -> None:
    product = model_event("inventory:product", 41)
    assert row_key(product) == ["inventory:product", 41]
    # What another language computes: CRC-32 of the key's compact JSON text.
    assert partition_of(product, 8) == zlib.crc32(b'["inventory:product",41]') % 8
    # Every event of one row goes to one partition; the same pk of another model may not.
    assert partition_of(model_event("inventory:product", 41), 8) == partition_of(product, 8)
    custom = Event(type=EventType.CUSTOM, topic="billing:invoice", payload={"total": 3})
    assert row_key(custom) == "billing:invoice"
    assert partition_of(custom, 8, key=lambda e: e.payload["total"]) == zlib.crc32(b"3") % 8
    # Many rows spread over every partition.
    spread = Counter(partition_of(model_event("inventory:product", pk), 4) for pk in range(400))
    assert set(spread) == {0, 1, 2, 3} and min(spread.values()) > 60
    assert cursor_name("app.reindex", 2, 4) == "app.reindex#2/4"


def test_partitions_are_validated_at_registration_and_by_the_system_check() -> None:
    with pytest.raises(ValueError, match="partitions must be >= 1"):
        register(Consumer(name="t.bad", pattern="x", func=print, partitions=0))
    with pytest.raises(ValueError, match="need a durable consumer"):
        register(Consumer(name="t.bad", pattern="x", func=print, partitions=2, durable=False))
    with override_settings(EVENTBUS={"PARTITIONS_PER_LISTENER": 0}):
        errors = [e for e in run_checks() if e.id == "django_eventbus.E018"]
    assert errors and "PARTITIONS_PER_LISTENER" in errors[0].msg


# -- two listeners in one process (memory bus): shares, rebalancing, order -----------------


def _save(names: list[str]) -> list[int]:
    try:
        return [Product.objects.create(name=name, stock=1).pk for name in names]
    finally:
        connections.close_all()


def _update(pks: list[int], rounds: int) -> None:
    try:
        for round_ in range(rounds):
            for pk in pks:
                product = Product.objects.get(pk=pk)
                product.stock = round_ + 1
                product.save()
    finally:
        connections.close_all()


async def test_two_listeners_share_the_partitions_and_take_over_each_others() -> None:
    name = f"t.part.{uuid.uuid4().hex[:6]}"
    handled: list[tuple[str, int, int]] = []  # (listener, pk, stock)

    def consumer_for(label: str) -> Consumer:
        def handle(event: Event) -> None:
            handled.append((label, event.payload["pk"], event.payload["fields"]["stock"]))

        return Consumer(name=name, pattern="inventory:product", func=handle, partitions=4)

    bus: Any = create_event_bus({"backend": "memory"})
    await bus.connect()
    first = Listener(bus, [consumer_for("a")], interval=0.2, owner="host:1:a")
    await first.start()
    # Alone, the first listener holds all four partitions.
    assert sorted(r.name for r in first.runners if r.active()) == [cursor_name(name, i, 4) for i in range(4)]
    second = Listener(bus, [consumer_for("b")], interval=0.2, owner="host:2:b")
    await second.start()
    try:
        # The second joins: the first hands two partitions over, the second takes them.
        await await_until(
            lambda: (
                sum(r.active() for r in first.runners) == 2 and sum(r.active() for r in second.runners) == 2
            ),
            what="two partitions each",
        )
        owners = await orm(
            lambda: dict(
                ConsumerCursor.objects.filter(name__startswith=f"{name}#").values_list("name", "owner")
            )
        )
        assert Counter(owners.values()) == {"host:1:a": 2, "host:2:b": 2}

        pks = await asyncio.to_thread(_save, [f"p{i}" for i in range(40)])
        await asyncio.to_thread(_update, pks, 3)
        await await_until(lambda: len(handled) == 160, what="40 creates and 120 updates handled")
        assert {label for label, _, _ in handled} == {"a", "b"}  # both did work
        # Once each, and each row's events in commit order (stock 1 on create, then 1, 2, 3).
        per_row: dict[int, list[int]] = {}
        for _, pk, stock in handled:
            per_row.setdefault(pk, []).append(stock)
        assert per_row == {pk: [1, 1, 2, 3] for pk in pks}
        # One listener handles a row's events: they hash to one partition.
        assert all(len({label for label, pk2, _ in handled if pk2 == pk}) == 1 for pk in pks)

        # The first stops: its partitions go to the second, which handles what follows.
        await first.stop()
        await await_until(lambda: sum(r.active() for r in second.runners) == 4, what="second owns all four")
        assert not await orm(lambda: ConsumerMember.objects.filter(consumer=name, owner="host:1:a").exists())
        handled.clear()
        more = await asyncio.to_thread(_save, [f"q{i}" for i in range(20)])
        await await_until(lambda: len(handled) == 20, what="20 more handled")
        assert sorted(pk for _, pk, _ in handled) == sorted(more)
        assert {label for label, _, _ in handled} == {"b"}
    finally:
        await first.stop()
        await second.stop()
        await bus.close()


async def test_a_cap_leaves_partitions_to_other_listeners() -> None:
    name = f"t.cap.{uuid.uuid4().hex[:6]}"
    consumer = Consumer(name=name, pattern="inventory:product", func=lambda e: None, partitions=3)
    bus: Any = create_event_bus({"backend": "memory"})
    await bus.connect()
    with override_settings(EVENTBUS={"PARTITIONS_PER_LISTENER": 2}):
        listener = Listener(bus, [consumer], interval=0.2)
        await listener.start()
        try:
            assert sum(r.active() for r in listener.runners) == 2
        finally:
            await listener.stop()
    await bus.close()


async def test_new_partitions_start_where_the_unpartitioned_cursor_stood() -> None:
    name = f"t.repart.{uuid.uuid4().hex[:6]}"
    got: list[str] = []
    await asyncio.to_thread(_save, ["before"])
    position = await orm(lambda: StoredEvent.objects.order_by("-id").values_list("id", flat=True).first())
    assert position is not None
    await orm(lambda: leases.ensure_cursor(name, position))  # it ran unpartitioned up to here
    await asyncio.to_thread(_save, ["missed-1", "missed-2"])  # logged while no listener ran
    consumer = Consumer(
        name=name,
        pattern="inventory:product",
        func=lambda e: got.append(e.payload["fields"]["name"]),
        partitions=2,
    )
    bus: Any = create_event_bus({"backend": "memory"})
    await bus.connect()
    listener = Listener(bus, [consumer], interval=0.2)
    await listener.start()
    try:
        await await_until(lambda: sorted(got) == ["missed-1", "missed-2"], what="the backlog handled")
        positions = await orm(
            lambda: set(
                ConsumerCursor.objects.filter(name__startswith=f"{name}#").values_list("position", flat=True)
            )
        )
        assert len(positions) == 1 and positions.pop() > position
    finally:
        await listener.stop()
        await bus.close()


# -- real listener processes ----------------------------------------------------------------


def _recorded_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        if path.exists():
            names += [line.split(" ")[1] for line in path.read_text().splitlines() if line.count(" ") == 2]
    return names


def _save_slowly(names: list[str]) -> None:
    try:
        for name in names:
            Product.objects.create(name=name, stock=5)
            time.sleep(0.002)
    finally:
        connections.close_all()


def _shares(consumer: str) -> list[int]:
    """How many partitions of ``consumer`` each listener holds, ascending."""
    owners = ConsumerCursor.objects.filter(name__startswith=f"{consumer}#").values_list("owner", flat=True)
    return sorted(Counter(owner for owner in owners if owner).values())


@pytest.mark.parametrize("bus_kind", ["postgres", "redis"], indirect=True)
def test_listener_processes_share_partitions_and_survive_one_leaving(
    bus_kind: str, shared_database: str, tmp_path: Path
) -> None:
    env = {**_env_of_current_bus(), "EVENTBUS_RECORD_PARTITIONS": "4", "EVENTBUS_LEASE_TTL": "3"}
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    first = start_listener(env, files[0], shared_database)
    second = start_listener(env, files[1], shared_database)
    processes = [first, second]
    try:
        wait_until(lambda: _shares("inventory.recorder") == [2, 2], what="two partitions per listener")
        names = [f"s{i}" for i in range(600)]
        writer = threading.Thread(target=_save_slowly, args=(names,))
        writer.start()
        wait_until(lambda: len(_recorded_names(files)) >= 150, what="first events handled")
        first.send_signal(signal.SIGTERM)  # a rolling deploy: the second takes all four over
        assert first.wait(15) == 0
        writer.join(120)
        wait_until(lambda: set(_recorded_names(files)) >= set(names), timeout=90, what="all 600 handled")
        counts = Counter(_recorded_names(files))
        assert [n for n in names if counts[n] != 1] == []  # none lost, none twice
        assert files[0].exists() and files[1].exists()  # both processes did work
        owners = set(
            ConsumerCursor.objects.filter(name__startswith="inventory.recorder#").values_list(
                "owner", flat=True
            )
        )
        assert len(owners) == 1 and "" not in owners
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(15)
