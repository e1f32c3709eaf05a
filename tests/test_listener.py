"""Consumers and the listener: every committed event handled once, whatever fails in between.

The fault tests run against the real servers with the Django database on
PostgreSQL (several processes share it); .ci/run runs them in its PostgreSQL pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

import django_eventbus
from django_eventbus.conf import conf
from django_eventbus.delivery.consumers import Consumer, get_consumers, register, unregister
from django_eventbus.delivery.listener import Listener
from django_eventbus.events import BaseEventBus, Event, EventType, create_event_bus
from django_eventbus.models import ConsumerCursor, DeadLetter, StoredEvent
from testproject.inventory.models import Product
from tests.listener_processes import ROOT, recorded, save_products, start_listener
from tests.listener_processes import env_of_current_bus as _env_of_current_bus
from tests.orm import orm
from tests.polling import await_until, wait_until
from tests.services import require_postgres, require_redis

pytestmark = pytest.mark.django_db(transaction=True)
T = TypeVar("T")


def listener_bus_config(name: str) -> dict[str, Any]:
    """The same bus as the Django layer's, with connections we can find and kill."""
    config = conf.bus_config()
    if config["backend"] == "postgres":
        config["connection_string"] += f" application_name={name}"
    else:
        config["url"] += ("&" if "?" in config["url"] else "?") + f"client_name={name}"
    return config


def kill_listener_connection(kind: str, name: str) -> int:
    if kind == "postgres":
        import psycopg

        with psycopg.connect(require_postgres(), autocommit=True) as admin:
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
                [f"{name}:%"],
            ).fetchall()
            return len(rows)
    import redis

    client = redis.Redis.from_url(require_redis())
    try:
        return int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))  # type: ignore[no-untyped-call]
    finally:
        client.close()


@pytest.mark.parametrize("bus_kind", ["postgres", "redis"], indirect=True)
async def test_killed_listener_connection_loses_and_repeats_nothing(bus_kind: str) -> None:
    name = f"killtest{uuid.uuid4().hex[:6]}"
    seen: list[str] = []
    restored = asyncio.Event()
    bus = cast(BaseEventBus, create_event_bus(listener_bus_config(name)))
    await bus.connect()
    bus.on_connection_restored(restored.set)
    consumer = Consumer(
        name=f"test.{name}", pattern="inventory:product", func=lambda e: seen.append(e.event_id)
    )
    listener = Listener(bus, [consumer], interval=0.5)
    await listener.start()
    names = [f"k{i}" for i in range(2000)]
    writer = asyncio.create_task(asyncio.to_thread(save_products, names))
    try:
        await await_until(lambda: len(seen) > 300, what="first events")
        assert await asyncio.to_thread(kill_listener_connection, bus_kind, name) >= 1
        await asyncio.wait_for(restored.wait(), 30)
        await await_until(lambda: len(seen) > 1200, what="more events")
        assert await asyncio.to_thread(kill_listener_connection, bus_kind, name) >= 1
        await writer
        await await_until(lambda: len(set(seen)) >= 2000, timeout=60, what="all 2,000 events")
        await asyncio.sleep(1.0)  # late duplicates would show up now
    finally:
        writer.cancel()
        await listener.stop()
        await bus.close()
    logged = await orm(lambda: set(StoredEvent.objects.values_list("event_id", flat=True)))
    assert len(seen) == len(set(seen)) == 2000, "each event exactly once"
    assert set(seen) == logged
    assert bus.stats.reconnects >= 2


@pytest.mark.parametrize("bus_kind", ["postgres", "redis"], indirect=True)
def test_sigkilled_listener_restarts_without_losing_events(
    bus_kind: str, shared_database: str, tmp_path: Path
) -> None:
    record_to = tmp_path / "handled.txt"
    env = _env_of_current_bus()
    first = start_listener(env, record_to, shared_database)
    names = [f"s{i}" for i in range(400)]
    writer = threading.Thread(target=save_products, args=(names, 0.004))
    writer.start()
    try:
        wait_until(lambda: len(recorded(record_to)) >= 100, what="first events handled")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        time.sleep(0.5)  # events published now reach nobody: catch-up must find them
        second = start_listener(env, record_to, shared_database)
        writer.join(60)
        wait_until(lambda: set(recorded(record_to)) >= set(names), timeout=60, what="all 400 handled")
        time.sleep(1.0)
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    finally:
        for process in (first, locals().get("second")):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    handled = recorded(record_to)
    duplicates = len(handled) - len(set(handled))
    assert set(handled) == set(names)
    assert duplicates <= 1, f"{duplicates} events handled twice (at most the one in flight may be)"


PUBLISHER_DIES = """
import os, django
django.setup()
from django_eventbus.capture import outbox
outbox._publish_now = lambda events, wait=False: os._exit(0)  # dies after COMMIT, before the publish
from testproject.inventory.models import Product
Product.objects.create(name="orphan")
raise SystemExit("not reached")
"""


@pytest.mark.parametrize("bus_kind", ["redis"], indirect=True)
async def test_publisher_that_dies_between_commit_and_publish(bus_kind: str, shared_database: str) -> None:
    seen: list[Event] = []
    bus = cast(BaseEventBus, create_event_bus(conf.bus_config()))
    await bus.connect()
    consumer = Consumer(name=f"test.orphan.{uuid.uuid4().hex[:6]}", pattern="inventory:*", func=seen.append)
    listener = Listener(bus, [consumer], interval=0.3)
    await listener.start()
    try:
        env = {**os.environ, **_env_of_current_bus(), "DATABASE_URL": shared_database}
        env["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", PUBLISHER_DIES],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        await await_until(lambda: len(seen) == 1, timeout=15, what="the orphan event via the log")
    finally:
        await listener.stop()
        await bus.close()
    assert seen[0].payload["fields"]["name"] == "orphan"
    assert bus.stats.delivered == 0  # it never travelled on the bus: the log delivered it


@pytest.mark.parametrize("bus_kind", ["postgres", "redis"], indirect=True)
async def test_failing_consumer_is_retried_then_dead_lettered_and_others_proceed(
    bus_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    good: list[str] = []
    flaky_calls: list[str] = []
    broken_calls: list[str] = []

    async def broken(event: Event) -> None:
        broken_calls.append(event.payload["fields"]["name"])
        if event.payload["fields"]["name"] == "poison":
            raise ValueError("cannot handle poison")

    def flaky(event: Event) -> None:
        flaky_calls.append(event.event_id)
        if flaky_calls.count(event.event_id) == 1:
            raise ConnectionError("transient")

    suffix = uuid.uuid4().hex[:6]
    consumers = [
        Consumer(
            name=f"t.broken.{suffix}", pattern="inventory:product", func=broken, retries=2, retry_delay=0.01
        ),
        Consumer(
            name=f"t.flaky.{suffix}", pattern="inventory:product", func=flaky, retries=2, retry_delay=0.01
        ),
        Consumer(name=f"t.good.{suffix}", pattern="inventory:*", func=lambda e: good.append(e.event_id)),
    ]
    bus = cast(BaseEventBus, create_event_bus(conf.bus_config()))
    await bus.connect()
    listener = Listener(bus, consumers, interval=0.3)
    await listener.start()
    try:
        with caplog.at_level(logging.WARNING, logger="django_eventbus"):
            await asyncio.to_thread(save_products, ["before", "poison", "after"])
            await await_until(lambda: len(good) == 3 and broken_calls[-1:] == ["after"], what="all handled")
            await await_until(lambda: len(flaky_calls) == 6, what="flaky retried")
    finally:
        await listener.stop()
        await bus.close()
    assert broken_calls == ["before", "poison", "poison", "poison", "after"]  # 1 + 2 retries, then moved on
    letters = await orm(lambda: list(DeadLetter.objects.all()))
    assert [(d.consumer, d.attempts, d.event["payload"]["fields"]["name"]) for d in letters] == [
        (f"t.broken.{suffix}", 3, "poison")
    ]
    assert "cannot handle poison" in letters[0].error
    assert any(letters[0].event_id in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    # the flaky consumer succeeded on its retry: once per event, no dead letter
    assert len(set(flaky_calls)) == 3
    cursors = await orm(lambda: {c.name: c.position for c in ConsumerCursor.objects.all()})
    last = await orm(lambda: StoredEvent.objects.order_by("-id").values_list("id", flat=True).first())
    assert all(position == last for position in cursors.values())


def test_listen_command_prints_replays_and_stops_cleanly(shared_database: str, settings: Any) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}"
    settings.EVENTBUS = {
        **settings.EVENTBUS,
        "BUS": {"backend": "redis", "url": require_redis(), "channel_prefix": prefix},
    }
    save_products(["old-1", "old-2"])
    first_id = StoredEvent.objects.order_by("id").values_list("event_id", flat=True).first()
    env = {
        **os.environ,
        "DATABASE_URL": shared_database,
        "EVENTBUS_URL": require_redis(),
        "EVENTBUS_CHANNEL_PREFIX": prefix,
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "manage.py", "eventbus_listen", "inventory:*", "--json", "--since", str(first_id)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(process.stdout))  # type: ignore[arg-type]
        reader.start()
        wait_until(lambda: len(lines) >= 1, what="replayed event")
        time.sleep(1.0)  # the listener is subscribed by now
        save_products(["live"])
        from django_eventbus.delivery.runtime import get_runner

        get_runner().flush()
        wait_until(lambda: len(lines) >= 2, what="live event")
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        reader.join(5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read() if process.stderr else ""
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    import json

    events = [json.loads(line) for line in lines]
    assert [e["payload"]["fields"]["name"] for e in events] == ["old-2", "live"]  # after --since, then live
    assert all(e["topic"] == "inventory:product" for e in events)
    assert "shutting down" in stderr


def test_listen_command_errors() -> None:
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match="neither a logged event id nor an ISO 8601 time"):
        call_command("eventbus_listen", "x", "--since", "nope")
    with pytest.raises(CommandError, match="nothing to do"):
        call_command("eventbus_listen", "--no-consumers")


def test_format_line_is_one_readable_line() -> None:
    from django_eventbus.management.commands.eventbus_listen import format_line

    event = Event(type=EventType.UPDATED, topic="inventory:product", payload={"x": "y" * 500})
    line = format_line(event)
    assert "\n" not in line and line.count("…") == 1 and len(line) < 250
    assert " updated " in line and event.event_id in line and "inventory:product" in line


def test_consumer_modules_are_autodiscovered() -> None:
    names = [c.name for c in get_consumers()]
    assert "inventory.low_stock" in names


def test_memory_bus_runs_consumers_in_the_web_process(settings: Any) -> None:
    from django_eventbus.delivery.runtime import reset_runner

    got: list[str] = []
    register(Consumer(name="t.memory", pattern="inventory:product", func=lambda e: got.append(e.topic)))
    reset_runner()  # the next bus picks the new consumer up
    try:
        settings.EVENTBUS = {**settings.EVENTBUS, "BUS": "memory://"}
        Product.objects.create(name="m")
        wait_until(lambda: got == ["inventory:product"], timeout=5, what="consumer ran")
    finally:
        unregister("t.memory")
        reset_runner()


def test_consumer_decorator_registers_and_validates() -> None:
    @django_eventbus.consumer("a:*", name="t.decorated", retries=0)
    async def handler(event: Event) -> None:
        pass

    try:
        [item] = [c for c in get_consumers() if c.name == "t.decorated"]
        assert item.is_async and item.is_pattern and item.matches("a:b") and not item.matches("b:a")
        assert item.durable and item.retries == 0
    finally:
        unregister("t.decorated")
    with pytest.raises(ValueError):
        register(Consumer(name="x", pattern="p", func=print, retries=-1))
