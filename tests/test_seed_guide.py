"""Every code sample of the seed guide (shared/seed), run as written.

The only edit is the one the guide's port asks for: ``dataknobs_common`` is
replaced by ``django_eventbus``. The guide's text lost its indentation, so the
samples are restored here with the indentation their syntax requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import textwrap
import uuid
from typing import Any

import pytest

from django_eventbus.events import Event, EventType, create_event_bus
from tests.services import require_postgres, require_redis

QUICK_START = """
import asyncio
from django_eventbus.events import create_event_bus, Event, EventType
async def main():
    # Create event bus from config
    bus = create_event_bus({"backend": "memory"})
    await bus.connect()
    # Subscribe to events
    async def on_event(event: Event) -> None:
        print(f"Received {event.type.value} on {event.topic}")
        print(f"Payload: {event.payload}")
    subscription = await bus.subscribe("my-topic", on_event)
    # Publish an event
    await bus.publish("my-topic", Event(
        type=EventType.CREATED,
        topic="my-topic",
        payload={"message": "Hello, World!"}
    ))
    # Give time for async delivery
    await asyncio.sleep(0.1)
    # Cleanup
    await subscription.cancel()
    await bus.close()
if __name__ == "__main__":
    asyncio.run(main())
"""


def run_sample(source: str, namespace: dict[str, Any] | None = None) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(
            compile(textwrap.dedent(source), "<seed sample>", "exec"),
            namespace if namespace is not None else {},
        )
    return out.getvalue()


def test_quick_start() -> None:
    printed = run_sample(QUICK_START, {"__name__": "__main__"})
    assert printed == "Received created on my-topic\nPayload: {'message': 'Hello, World!'}\n"


def test_event_types_sample() -> None:
    namespace: dict[str, Any] = {}
    run_sample(
        """
        from django_eventbus.events import EventType
        EventType.CREATED # New resource created
        EventType.UPDATED # Resource modified
        EventType.DELETED # Resource removed
        EventType.ACTIVATED # Resource activated/enabled
        EventType.DEACTIVATED # Resource deactivated/disabled
        EventType.ERROR # Error occurred
        EventType.CUSTOM # Custom event type
        """,
        namespace,
    )
    assert namespace["EventType"].ERROR.value == "error"


async def test_postgres_sample_connects_to_a_real_server() -> None:
    namespace: dict[str, Any] = {"create_event_bus": create_event_bus}
    run_sample(
        f"""
        bus = create_event_bus({{
            "backend": "postgres",
            "connection_string": "{require_postgres()}"
        }})
        """,
        namespace,
    )
    bus = namespace["bus"]
    await bus.connect()
    got: list[Event] = []
    topic = f"seed-{uuid.uuid4().hex}"
    await bus.subscribe(topic, got.append)
    await bus.publish(topic, Event(type=EventType.CREATED, topic=topic))
    for _ in range(500):
        if got:
            break
        await asyncio.sleep(0.01)
    await bus.close()
    assert len(got) == 1


def test_elasticache_sample_builds_a_tls_redis_bus() -> None:
    from django_eventbus.events.redis import RedisEventBus

    namespace: dict[str, Any] = {"create_event_bus": create_event_bus}
    run_sample(
        """
        bus = create_event_bus({
            "backend": "redis",
            "host": "my-cluster.cache.amazonaws.com",
            "port": 6379,
            "ssl": True
        })
        """,
        namespace,
    )
    assert isinstance(namespace["bus"], RedisEventBus)  # built, not connected: no network needed


async def test_multiple_subscribers_sample() -> None:
    bus = create_event_bus({"backend": "memory"})
    await bus.connect()
    namespace: dict[str, Any] = {"bus": bus, "Event": Event}
    run_sample(
        """
        async def logger(event: Event) -> None:
            print(f"LOG: {event.type.value} - {event.payload}")
        async def metrics(event: Event) -> None:
            # Record metrics
            pass
        async def notifier(event: Event) -> None:
            # Send notifications
            pass
        async def setup():
            await bus.subscribe("registry:bots", logger)
            await bus.subscribe("registry:bots", metrics)
            await bus.subscribe("registry:bots", notifier)
        """,
        namespace,
    )
    await namespace["setup"]()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        await bus.publish(
            "registry:bots", Event(type=EventType.UPDATED, topic="registry:bots", payload={"a": 1})
        )
    assert out.getvalue() == "LOG: updated - {'a': 1}\n"
    await bus.close()


async def test_error_handling_sample_reads_event_id() -> None:
    bus = create_event_bus({"backend": "memory"})
    await bus.connect()
    errors: list[Event] = []
    await bus.subscribe("errors", errors.append)

    async def process_event(event: Event) -> None:
        raise RuntimeError("cannot process")

    namespace: dict[str, Any] = {
        "bus": bus,
        "Event": Event,
        "EventType": EventType,
        "process_event": process_event,
        "logger": logging.getLogger("seed"),
    }
    run_sample(
        """
        async def safe_handler(event: Event) -> None:
            try:
                await process_event(event)
            except Exception as e:
                logger.error(f"Failed to process event {event.id}: {e}")
                # Optionally publish error event
                await bus.publish("errors", Event(
                    type=EventType.ERROR,
                    topic="errors",
                    payload={"original_event_id": event.id, "error": str(e)}
                ))
        """,
        namespace,
    )
    await bus.subscribe("work", namespace["safe_handler"])
    work = Event(type=EventType.CREATED, topic="work")
    await bus.publish("work", work)
    assert [e.payload for e in errors] == [{"original_event_id": work.event_id, "error": "cannot process"}]
    await bus.close()


async def test_graceful_shutdown_sample() -> None:
    namespace: dict[str, Any] = {
        "create_event_bus": create_event_bus,
        "config": {"backend": "memory"},
        "asyncio": asyncio,
    }
    run_sample(
        """
        import signal
        subscriptions = []
        bus = create_event_bus(config)
        async def shutdown():
            for sub in subscriptions:
                await sub.cancel()
            await bus.close()
        # Handle shutdown signals
        loop = asyncio.get_event_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.create_task(shutdown()))
        """,
        namespace,
    )
    bus = namespace["bus"]
    await bus.connect()
    namespace["subscriptions"].append(await bus.subscribe("t", lambda e: None))
    loop = asyncio.get_running_loop()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):
            if bus.state.value == "closed":
                break
            await asyncio.sleep(0.01)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
    assert bus.state.value == "closed"
    assert not namespace["subscriptions"][0].active


async def test_registry_integration_sample_publishes_config_changes() -> None:
    # The half of the sample that is ours; CachingRegistryManager belongs to dataknobs_bots.
    bus = create_event_bus({"backend": "memory"})
    await bus.connect()
    got: list[Event] = []
    await bus.subscribe("registry:bots", got.append)
    namespace: dict[str, Any] = {"bus": bus}
    run_sample(
        """
        from django_eventbus.events import create_event_bus, Event, EventType
        # Event bus publishes when configs change
        async def on_config_change(bot_id: str, config: dict):
            await bus.publish("registry:bots", Event(
                type=EventType.UPDATED,
                topic="registry:bots",
                payload={"bot_id": bot_id, "config": config}
            ))
        """,
        namespace,
    )
    await namespace["on_config_change"]("b1", {"model": "x"})
    assert got[0].payload == {"bot_id": "b1", "config": {"model": "x"}}
    await bus.close()


def test_module_exports_sample() -> None:
    run_sample(
        """
        from django_eventbus.events import (
            # Protocol
            EventBus,
            # Factory
            create_event_bus,
            # Types
            Event,
            EventType,
            Subscription,
            # In-memory implementation
            InMemoryEventBus,
        )
        # Production backends (import directly)
        from django_eventbus.events.postgres import PostgresEventBus
        from django_eventbus.events.redis import RedisEventBus
        """
    )


def test_protocol_has_the_reference_methods() -> None:
    from django_eventbus.events import EventBus

    for name in ("connect", "close", "publish", "subscribe"):
        assert asyncio.iscoroutinefunction(getattr(EventBus, name))


# The guide's "Testing" section, as written (a fixture and a test).
# fmt: off
@pytest.fixture
async def event_bus():  # type: ignore[no-untyped-def]
    bus = create_event_bus({"backend": "memory"})
    await bus.connect()
    yield bus
    await bus.close()


async def test_publish_subscribe(event_bus):  # type: ignore[no-untyped-def]
    received = []

    async def handler(event: Event) -> None:
        received.append(event)

    await event_bus.subscribe("test", handler)
    await event_bus.publish("test", Event(
        type=EventType.CREATED,
        topic="test",
        payload={"key": "value"}
    ))
    assert len(received) == 1
    assert received[0].payload["key"] == "value"
# fmt: on


async def test_redis_seed_config_keys_reach_a_real_server() -> None:
    from urllib.parse import urlsplit

    url = urlsplit(require_redis())
    bus = create_event_bus({"backend": "redis", "host": url.hostname, "port": url.port or 6379, "db": 0})
    await bus.connect()
    got: list[Event] = []
    topic = f"seed-{uuid.uuid4().hex}"
    await bus.subscribe(topic, got.append)
    await bus.publish(topic, Event(type=EventType.CREATED, topic=topic))
    for _ in range(500):
        if got:
            break
        await asyncio.sleep(0.01)
    await bus.close()
    assert len(got) == 1


# -- Code written for the seed library runs unchanged (issue 17 §3) ------------------


async def test_an_empty_config_is_the_in_memory_bus() -> None:
    from django_eventbus.events import InMemoryEventBus

    assert isinstance(create_event_bus({}), InMemoryEventBus)
    assert isinstance(create_event_bus(), InMemoryEventBus)


async def test_subscription_takes_and_keeps_its_handler() -> None:
    from django_eventbus.events import Subscription

    def handler(event: Event) -> None:
        pass

    made_by_hand = Subscription(topic="t", handler=handler)
    assert made_by_hand.handler is handler
    bus = create_event_bus({"backend": "memory"})
    await bus.connect()
    try:
        subscription = await bus.subscribe("t", handler)
        assert subscription.handler is handler
    finally:
        await bus.close()


async def test_subscription_count_and_is_connected() -> None:
    bus: Any = create_event_bus({"backend": "memory"})
    assert bus.is_connected is False and bus._connected is False
    await bus.connect()
    # mypy keeps the narrowing of the first assert ("is False") across connect(): both lines look dead to it.
    assert bus.is_connected is True and bus._connected is True  # type: ignore[unreachable]
    first = await bus.subscribe("a", lambda e: None)  # type: ignore[unreachable]
    await bus.subscribe("b:*", lambda e: None, pattern="b:*")
    assert bus.subscription_count == 2
    await first.cancel()
    assert bus.subscription_count == 1
    await bus.close()
    assert bus.is_connected is False and bus.subscription_count == 0
