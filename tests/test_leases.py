"""Leases: one listener process owns a durable consumer; standbys take over; fenced cursor writes.

The process tests run real ``manage.py eventbus_listen`` processes on both buses with the
Django database on PostgreSQL (several processes share it), like tests/test_listener.py.
"""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db.models import F
from django.utils import timezone

from django_eventbus.delivery import leases
from django_eventbus.delivery.consumers import Consumer, register, unregister
from django_eventbus.delivery.listener import Listener
from django_eventbus.events import Event, create_event_bus
from django_eventbus.models import ConsumerCursor, StoredEvent
from testproject.inventory.models import Tag
from tests.listener_processes import env_of_current_bus as _env_of_current_bus
from tests.listener_processes import recorded, save_products, start_listener
from tests.orm import orm
from tests.polling import wait_until
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.django_db(transaction=True)
RECORDER = "inventory.recorder"  # testproject's consumer behind EVENTBUS_RECORD_TO


# -- the statements ------------------------------------------------------------------------


def test_lease_is_taken_once_renewed_fenced_and_released() -> None:
    name = f"t.lease.{uuid.uuid4().hex[:6]}"
    leases.ensure_cursor(name, 7)
    leases.ensure_cursor(name, 99)  # a second listener racing to create it changes nothing
    assert ConsumerCursor.objects.get(name=name).position == 7

    assert leases.acquire(name, "a") == 1
    assert leases.acquire(name, "b") is None  # owned and not expired
    assert leases.renew(name, "a", 1)
    assert leases.save_cursor(name, "a", 1, 8, ["x"])
    row = ConsumerCursor.objects.get(name=name)
    assert (row.owner, row.generation, row.position, row.handled) == ("a", 1, 8, ["x"])
    assert row.expires_at is not None and row.expires_at > timezone.now()

    # "a" stops renewing (SIGKILL, a pause): after the expiry "b" takes over.
    ConsumerCursor.objects.filter(name=name).update(expires_at=F("expires_at") - timedelta(minutes=1))
    assert leases.acquire(name, "b") == 2
    assert not leases.save_cursor(name, "a", 1, 1000, [])  # the fence: a's write matches no row
    assert not leases.renew(name, "a", 1)
    assert ConsumerCursor.objects.get(name=name).position == 8

    leases.release(name, "b", 2)
    assert leases.acquire(name, "a") == 3  # released: free at once


async def test_catch_up_forgets_live_handled_ids_it_passes_and_skips_those_events() -> None:
    got: list[Event] = []
    consumer = Consumer(name=f"t.pass.{uuid.uuid4().hex[:6]}", pattern="inventory:product", func=got.append)
    await asyncio.to_thread(save_products, ["c1", "c2", "c3"])
    rows = await orm(lambda: list(StoredEvent.objects.order_by("id").values_list("id", "event_id")))
    bus: Any = create_event_bus({"backend": "memory"})
    await bus.connect()
    listener = Listener(bus, [consumer], start_after=rows[0][0] - 1, interval=3600)
    runner = listener.runners[0]
    await runner.prepare()
    assert await runner.acquire()
    runner.handled = {rows[1][1]: None}  # c2 came live, above a gap the log had not filled yet
    try:
        assert await runner.catch_up() == 2
        assert [e.payload["fields"]["name"] for e in got] == ["c1", "c3"]
        # Passed by the position, c2 leaves ``handled``: the cursor does not grow with every live event.
        assert runner.handled == {} and runner.position == rows[-1][0]
        cursor = await orm(lambda: ConsumerCursor.objects.get(name=consumer.name))
        assert (cursor.position, cursor.handled) == (rows[-1][0], [])
    finally:
        await listener.stop()
        await bus.close()


# -- atomic consumers ----------------------------------------------------------------------


async def test_atomic_consumer_commits_its_writes_with_the_cursor_and_rolls_back_a_fenced_one() -> None:
    attempts: dict[str, int] = {}

    def tag(event: Event) -> None:
        Tag.objects.create(name=event.event_id)
        attempts[event.event_id] = attempts.get(event.event_id, 0) + 1
        if len(attempts) == 2 and attempts[event.event_id] == 1:
            raise ConnectionError("injected failure after the write")

    consumer = Consumer(
        name=f"t.atomic.{uuid.uuid4().hex[:6]}",
        pattern="inventory:product",
        func=tag,
        atomic=True,
        retry_delay=0.01,
    )
    await asyncio.to_thread(save_products, ["a1", "a2", "a3"])
    first = await orm(lambda: StoredEvent.objects.order_by("id").values_list("id", flat=True).first())
    bus: Any = create_event_bus({"backend": "memory"})  # only catch-up is exercised here
    await bus.connect()
    assert first is not None
    listener = Listener(bus, [consumer], start_after=first - 1, interval=3600)
    await listener.start()
    try:
        ids = await orm(
            lambda: list(
                StoredEvent.objects.filter(topic="inventory:product").values_list("event_id", flat=True)
            )
        )
        # The failed attempt's Tag was rolled back with it: one row per event, no repeat.
        assert sorted(await orm(lambda: list(Tag.objects.values_list("name", flat=True)))) == sorted(ids)
        assert sorted(attempts.values()) == [1, 1, 2]
        last = await orm(lambda: StoredEvent.objects.order_by("-id").values_list("id", flat=True).first())
        assert await orm(lambda: ConsumerCursor.objects.get(name=consumer.name).position) == last

        # Another listener takes the lease (this one was paused past it): the next event's
        # handler runs, but its write and the cursor update roll back together.
        await orm(
            lambda: ConsumerCursor.objects.filter(name=consumer.name).update(
                owner="other", generation=F("generation") + 1
            )
        )
        await asyncio.to_thread(save_products, ["a4"])
        await listener.catch_up()
        assert await orm(lambda: Tag.objects.count()) == 3
        runner = listener.runners[0]
        assert not runner.active() and runner.lease is not None and runner.lease.generation is None
        assert await orm(lambda: ConsumerCursor.objects.get(name=consumer.name).position) == last
    finally:
        await listener.stop()
        await bus.close()


def test_atomic_needs_a_sync_durable_consumer() -> None:
    async def handler(event: Event) -> None:
        pass

    with pytest.raises(ValueError, match="atomic=True needs a durable consumer with a sync handler"):
        register(Consumer(name="t.bad.atomic", pattern="p", func=handler, atomic=True))


# -- real listener processes ---------------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Listener processes of a test; killed (and SIGCONT-ed first) at teardown, whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()


def owner_pid() -> int | None:
    owner = ConsumerCursor.objects.filter(name=RECORDER).values_list("owner", flat=True).first()
    return int(owner.split(":")[1]) if owner else None


def env_with(ttl: float) -> dict[str, str]:
    return {**_env_of_current_bus(), "EVENTBUS_LEASE_TTL": str(ttl)}


def writer(names: list[str], pause: float = 0.0) -> threading.Thread:
    thread = threading.Thread(target=save_products, args=(names, pause))
    thread.start()
    return thread


def assert_each_once(record_to: Path, names: list[str], repeats: int = 0) -> None:
    handled = recorded(record_to)
    assert set(handled) == set(names), f"{len(set(names) - set(handled))} events never handled"
    duplicates = len(handled) - len(set(handled))
    assert duplicates <= repeats, f"{duplicates} events handled twice (at most {repeats} allowed)"


@pytest.mark.parametrize("bus_kind", ["postgres", "redis"], indirect=True)
def test_rolling_deploy_hands_over_without_loss_or_duplicates(
    bus_kind: str, shared_database: str, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    record_to = tmp_path / "handled.txt"
    env = env_with(5.0)
    old = start_listener(env, record_to, shared_database)
    processes.append(old)
    wait_until(lambda: owner_pid() == old.pid, timeout=10, what="the first listener to own the consumer")
    new = start_listener(env, record_to, shared_database)
    processes.append(new)
    names = [f"r{i}" for i in range(1500)]
    thread = writer(names)
    wait_until(lambda: len(recorded(record_to)) >= 300, what="first events handled")
    old.send_signal(signal.SIGTERM)
    assert old.wait(20) == 0
    # Released on a clean stop: the standby owns the consumer within 1 s.
    wait_until(lambda: owner_pid() == new.pid, timeout=1.0, what="the standby to take over")
    thread.join(120)
    wait_until(lambda: set(recorded(record_to)) >= set(names), timeout=60, what="all 1,500 handled")
    new.send_signal(signal.SIGTERM)
    assert new.wait(20) == 0
    assert_each_once(record_to, names)


@pytest.mark.parametrize("bus_kind", ["postgres", "redis"], indirect=True)
def test_killed_owner_is_replaced_by_the_standby_within_the_lease_ttl(
    bus_kind: str, shared_database: str, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    record_to = tmp_path / "handled.txt"
    ttl = 2.0
    env = env_with(ttl)
    owner = start_listener(env, record_to, shared_database)
    processes.append(owner)
    wait_until(lambda: owner_pid() == owner.pid, timeout=10, what="the first listener to own the consumer")
    standby = start_listener(env, record_to, shared_database)
    processes.append(standby)
    names = [f"k{i}" for i in range(600)]
    thread = writer(names, 0.004)
    wait_until(lambda: len(recorded(record_to)) >= 100, what="first events handled")
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    killed = time.monotonic()
    wait_until(lambda: owner_pid() == standby.pid, timeout=ttl + 2.0, what="the standby to take over")
    assert time.monotonic() - killed <= ttl + 2.0
    thread.join(120)
    wait_until(lambda: set(recorded(record_to)) >= set(names), timeout=60, what="all 600 handled")
    standby.send_signal(signal.SIGTERM)
    assert standby.wait(20) == 0
    assert_each_once(record_to, names, repeats=1)  # at most the event in flight


@pytest.mark.parametrize("bus_kind", ["postgres", "redis"], indirect=True)
def test_paused_owner_loses_its_lease_and_never_writes_over_the_new_owner(
    bus_kind: str, shared_database: str, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    record_to = tmp_path / "handled.txt"
    log = tmp_path / "paused.log"
    ttl = 2.0
    env = env_with(ttl)
    paused = start_listener(env, record_to, shared_database, log_to=log)
    processes.append(paused)
    wait_until(lambda: owner_pid() == paused.pid, timeout=10, what="the first listener to own the consumer")
    standby = start_listener(env, record_to, shared_database)
    processes.append(standby)
    names = [f"p{i}" for i in range(600)]
    thread = writer(names, 0.004)
    wait_until(lambda: len(recorded(record_to)) >= 100, what="first events handled")
    paused.send_signal(signal.SIGSTOP)  # a GC pause, a frozen VM: no heartbeat, no exit
    wait_until(lambda: owner_pid() == standby.pid, timeout=ttl + 2.0, what="the standby to take over")
    count = len(recorded(record_to))
    wait_until(lambda: len(recorded(record_to)) >= count + 50, what="the new owner to handle events")
    paused.send_signal(signal.SIGCONT)  # it wakes up believing it owns the consumer
    wait_until(lambda: "lease lost" in log.read_text(), timeout=ttl + 2.0, what="the paused owner to notice")
    thread.join(120)
    wait_until(lambda: set(recorded(record_to)) >= set(names), timeout=60, what="all 600 handled")
    for process in (paused, standby):
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    assert owner_pid() is None  # released by the standby; the paused one wrote nothing over it
    cursor = ConsumerCursor.objects.get(name=RECORDER)
    # The saved cursor covers every event: below its position, or handled above a fresh gap.
    behind = StoredEvent.objects.filter(id__gt=cursor.position).exclude(event_id__in=cursor.handled)
    assert not behind.exists()
    assert_each_once(record_to, names, repeats=1)  # at most the event in flight at the pause


def test_sigterm_while_the_bus_server_is_down_exits_within_the_shutdown_timeout(
    shared_database: str,
    tmp_path: Path,
    processes: list[subprocess.Popen[str]],
    throwaway_redis: Callable[..., Awaitable[RedisServer]],
) -> None:
    async def start() -> RedisServer:
        return await throwaway_redis()

    server = asyncio.run(start())
    try:
        env = {"EVENTBUS_URL": server.url, "EVENTBUS_CHANNEL_PREFIX": f"d{uuid.uuid4().hex[:8]}"}
        process = start_listener(
            env, tmp_path / "handled.txt", shared_database, args=("--shutdown-timeout", "3")
        )
        processes.append(process)
        server.kill()  # the bus is down: the listener reconnects with backoff
        wait_until(lambda: process.poll() is None, timeout=1, what="the listener to keep running")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert time.monotonic() - started < 3 + 2.0  # the shutdown timeout plus process exit
    finally:
        server.kill()


def test_status_shows_the_owner_of_each_consumer() -> None:
    import json

    from django.core.management import call_command

    now = timezone.now()
    ConsumerCursor.objects.create(
        name="t.owned",
        position=0,
        owner="web-1:4242:0a1b2c3d",
        generation=3,
        owner_since=now - timedelta(minutes=2),
        expires_at=now + timedelta(seconds=4),
    )
    ConsumerCursor.objects.create(
        name="t.expired", position=0, owner="web-2:77:ffff0000", expires_at=now - timedelta(seconds=1)
    )
    register(Consumer(name="t.expired", pattern="inventory:*", func=print))
    try:
        as_json, as_text = io.StringIO(), io.StringIO()
        call_command("eventbus_status", "--json", stdout=as_json)
        call_command("eventbus_status", stdout=as_text)
    finally:
        unregister("t.expired")
    consumers = {c["name"]: c for c in json.loads(as_json.getvalue())["consumers"]}
    owned = consumers["t.owned"]
    assert (owned["owner_host"], owned["owner_pid"]) == ("web-1", 4242)
    assert owned["owner_since"] == (now - timedelta(minutes=2)).isoformat()
    assert consumers["t.expired"]["owner"] is None  # expired: the next listener to try takes it
    text = as_text.getvalue()
    assert "; owner web-1 pid 4242 since " in text
    assert "t.expired  [inventory:*]  position 0, lag 0 event(s), 0.0 s behind; no owner" in text
