"""Events routed to a Celery task run on a real worker, over a real Redis broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import redis

from django_eventbus.conf import conf
from django_eventbus.delivery.consumers import celery_route, get_consumers, register_celery_routes, unregister
from django_eventbus.delivery.listener import Listener
from django_eventbus.events import BaseEventBus, create_event_bus
from django_eventbus.models import StoredEvent
from testproject.inventory.models import Product
from tests.orm import orm
from tests.services import require_redis

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@pytest.fixture
def worker(settings: Any) -> Iterator[dict[str, str]]:
    """A Celery worker process on its own queue; yields where its task writes results."""
    broker = require_redis().rsplit("/", 1)[0] + "/2"
    queue = f"eventbus-test-{uuid.uuid4().hex[:8]}"
    results = {"url": broker, "key": f"eventbus:results:{queue}", "queue": queue}
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker,
        "EVENTBUS_TASK_RESULTS_URL": broker,
        "EVENTBUS_TASK_RESULTS_KEY": results["key"],
    }
    settings.CELERY_BROKER_URL = broker
    from testproject.celery import app

    app.conf.broker_url = broker
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "testproject",
            "worker",
            "--pool=solo",
            "-Q",
            queue,
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield results
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        client = redis.Redis.from_url(broker)
        client.delete(results["key"])
        client.close()


async def test_events_reach_a_celery_task_on_a_real_worker(worker: dict[str, str], settings: Any) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    settings.EVENTBUS = {
        **settings.EVENTBUS,
        "BUS": {"backend": "redis", "url": require_redis(), "channel_prefix": prefix},
    }
    route = celery_route(
        "inventory:product", "testproject.inventory.tasks.record_event", queue=worker["queue"]
    )
    bus = cast(BaseEventBus, create_event_bus(conf.bus_config()))
    await bus.connect()
    listener = Listener(bus, [route], interval=0.5)
    await listener.start()
    client = redis.Redis.from_url(worker["url"])
    try:
        products = await orm(lambda: [Product.objects.create(name=f"c{i}") for i in range(5)])
        expected = await orm(
            lambda: list(
                StoredEvent.objects.filter(topic="inventory:product").values_list("event_id", flat=True)
            )
        )
        deadline = time.monotonic() + 60
        while client.llen(worker["key"]) < len(products) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        done = [v.decode() for v in cast("list[bytes]", client.lrange(worker["key"], 0, -1))]
    finally:
        client.close()
        await listener.stop()
        await bus.close()
        unregister(route.name)
    assert sorted(done) == sorted(expected)  # each event enqueued and run once, on the worker


def test_celery_routes_setting_registers_consumers(settings: Any) -> None:
    settings.EVENTBUS = {
        **settings.EVENTBUS,
        "CELERY_ROUTES": {"inventory:*": "testproject.inventory.tasks.record_event"},
    }
    try:
        names = [c.name for c in get_consumers()]
        assert "celery:testproject.inventory.tasks.record_event:inventory:*" in names
    finally:
        settings.EVENTBUS = {**settings.EVENTBUS, "CELERY_ROUTES": {}}
    register_celery_routes()
    assert not [c for c in get_consumers() if c.name.startswith("celery:testproject")]
