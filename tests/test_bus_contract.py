"""The contract every backend keeps, run against memory, PostgreSQL and Redis.

One suite, parametrized by backend: if a behaviour is promised by the
``EventBus`` API it is tested here, for all three.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from django_eventbus.events import (
    BusClosedError,
    Event,
    EventSerializationError,
    EventType,
    create_event_bus,
)
from tests.polling import await_until as wait_for
from tests.services import require_postgres, require_redis

BACKENDS = ["memory", "postgres", "redis"]


def bus_config(backend: str) -> dict[str, Any]:
    # A fresh channel prefix per test: buses of other tests (or a stray listener) never interfere.
    prefix = f"contract_{uuid.uuid4().hex[:12]}"
    if backend == "memory":
        return {"backend": "memory"}
    if backend == "postgres":
        return {"backend": "postgres", "connection_string": require_postgres(), "channel_prefix": prefix}
    return {"backend": "redis", "url": require_redis(), "channel_prefix": prefix}


@pytest.fixture(params=BACKENDS)
async def make_bus(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """A factory of connected buses sharing one config, closed after the test."""
    config = bus_config(request.param)
    buses: list[Any] = []

    async def make() -> Any:
        if config["backend"] == "memory" and buses:
            return buses[0]  # one in-memory bus is the whole "network": publisher and subscriber share it
        bus = create_event_bus(config)
        await bus.connect()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


async def settle() -> None:
    """Long enough for a stray (wrong) delivery to show up on loopback."""
    await asyncio.sleep(0.3)


def ev(topic: str, **payload: Any) -> Event:
    return Event(type=EventType.CREATED, topic=topic, payload=payload)


async def test_round_trip_preserves_every_field(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    got: list[Event] = []
    await sub.subscribe("orders", got.append)
    sent = Event(
        type=EventType.DEACTIVATED,
        topic="orders",
        payload={"n": 1, "f": 1.5, "s": "ünï", "l": [1, {"x": None}], "b": True},
        timestamp=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
        source="host:1",
        correlation_id="req-1",
        metadata={"k": ["v"]},
    )
    await pub.publish("orders", sent)
    await wait_for(lambda: len(got) == 1)
    assert got[0] == sent
    assert got[0].event_id == sent.event_id == got[0].id
    assert got[0].timestamp == sent.timestamp
    assert got[0].type is EventType.DEACTIVATED


async def test_pattern_sees_every_matching_topic(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    got: list[str] = []
    await sub.subscribe("inventory", lambda e: got.append(e.topic), pattern="inventory:*")
    for topic in ["inventory:product", "inventory:order", "billing:invoice", "inventory:x:y"]:
        await pub.publish(topic, ev(topic))
    await wait_for(lambda: len(got) >= 3)
    await settle()
    assert got == ["inventory:product", "inventory:order", "inventory:x:y"]


async def test_exact_and_pattern_overlap_get_it_once_each(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    exact: list[str] = []
    pattern: list[str] = []
    await sub.subscribe("a:b", lambda e: exact.append(e.event_id))
    await sub.subscribe("a", lambda e: pattern.append(e.event_id), pattern="a:*")
    event = ev("a:b")
    await pub.publish("a:b", event)
    await wait_for(lambda: exact and pattern)
    await settle()
    assert exact == [event.event_id]
    assert pattern == [event.event_id]


COLLIDING = ["a:b", "a.b", "a-b", "a_b", "A:B", "a b", "ä:b", "t" * 300]


async def test_topics_never_collide(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    got: dict[str, list[str]] = {t: [] for t in COLLIDING}
    for topic in COLLIDING:
        await sub.subscribe(topic, lambda e, t=topic: got[t].append(e.topic))
    for topic in COLLIDING:
        await pub.publish(topic, ev(topic))
    await wait_for(lambda: all(got.values()))
    await settle()
    assert got == {t: [t] for t in COLLIDING}


async def test_large_payload_is_delivered(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    got: list[Event] = []
    await sub.subscribe("big", got.append)
    blob = "x€" * 100_000  # ~300 KB of UTF-8, far above PostgreSQL's 8000-byte NOTIFY limit
    await pub.publish("big", ev("big", blob=blob))
    await wait_for(lambda: len(got) == 1)
    assert got[0].payload["blob"] == blob


async def test_non_json_payload_fails_at_publish_and_nothing_is_delivered(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    got: list[Event] = []
    await sub.subscribe("t", got.append)
    with pytest.raises(EventSerializationError, match=r"payload\['when'\] is a datetime"):
        await pub.publish("t", ev("t", when=datetime.now(timezone.utc)))
    with pytest.raises(TypeError):  # it is a TypeError too, like json.dumps raises
        await pub.publish("t", ev("t", s={1, 2}))
    with pytest.raises(EventSerializationError, match="key 1"):
        await pub.publish("t", Event(type=EventType.CREATED, topic="t", payload={1: "int key"}))  # type: ignore[dict-item]
    await settle()
    assert got == []


async def test_events_arrive_in_order(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    got: list[int] = []
    await sub.subscribe("seq", lambda e: got.append(e.payload["i"]))
    for i in range(500):
        await pub.publish("seq", ev("seq", i=i))
    await wait_for(lambda: len(got) == 500)
    assert got == list(range(500))


async def test_concurrent_publishes_all_arrive(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    got: set[int] = set()
    await sub.subscribe("conc", lambda e: got.add(e.payload["i"]))
    await asyncio.gather(*(pub.publish("conc", ev("conc", i=i)) for i in range(300)))
    await wait_for(lambda: len(got) == 300)


async def test_publish_many_keeps_order(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    got: list[int] = []
    await sub.subscribe("batch", lambda e: got.append(e.payload["i"]))
    await pub.publish_many([ev("batch", i=i) for i in range(250)])
    await wait_for(lambda: len(got) == 250)
    assert got == list(range(250))


async def test_cancel_stops_delivery_and_is_idempotent(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    kept: list[int] = []
    cancelled: list[int] = []
    await sub.subscribe("c", lambda e: kept.append(e.payload["i"]))
    subscription = await sub.subscribe("c", lambda e: cancelled.append(e.payload["i"]))
    await pub.publish("c", ev("c", i=1))
    await wait_for(lambda: kept == [1] and cancelled == [1])
    await subscription.cancel()
    await subscription.cancel()
    assert not subscription.active
    await pub.publish("c", ev("c", i=2))
    await wait_for(lambda: kept == [1, 2])
    await settle()
    assert cancelled == [1]


async def test_publish_on_closed_bus_is_a_clear_error(make_bus: Any) -> None:
    bus = await make_bus()
    await bus.close()
    await bus.close()  # idempotent
    with pytest.raises(BusClosedError, match="closed"):
        await bus.publish("t", ev("t"))


async def test_topic_must_match_event_topic(make_bus: Any) -> None:
    bus = await make_bus()
    with pytest.raises(ValueError, match="must be equal"):
        await bus.publish("other", ev("t"))


async def test_raising_handler_is_logged_and_does_not_stop_others(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pub, sub = await make_bus(), await make_bus()
    got: list[str] = []

    async def broken(event: Event) -> None:
        raise RuntimeError("boom")

    await sub.subscribe("r", broken)
    await sub.subscribe("r", lambda e: got.append(e.event_id))
    event = ev("r")
    with caplog.at_level(logging.ERROR, logger="django_eventbus"):
        await pub.publish("r", event)
        await wait_for(lambda: got == [event.event_id])
        await wait_for(lambda: any(event.event_id in r.getMessage() for r in caplog.records))
    assert sub.stats.handler_errors == 1
    # the publisher is unaffected and the next event still flows
    await pub.publish("r", ev("r"))
    await wait_for(lambda: len(got) == 2)


@pytest.mark.parametrize("make_bus", ["postgres", "redis"], indirect=True)
async def test_slow_handler_does_not_delay_another_subscription(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    fast: list[float] = []
    release = asyncio.Event()

    async def slow(event: Event) -> None:
        await asyncio.wait_for(release.wait(), 30)

    await sub.subscribe("s", slow)
    await sub.subscribe("s", lambda e: fast.append(asyncio.get_running_loop().time()))
    start = asyncio.get_running_loop().time()
    for _ in range(20):
        await pub.publish("s", ev("s"))
    await wait_for(lambda: len(fast) == 20, timeout=5)
    assert fast[-1] - start < 2.0
    release.set()
