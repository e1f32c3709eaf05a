"""The framework-free core: Event, Subscription, the factory and the memory backend."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import pickle
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from django_eventbus.events import (
    BackendNotInstalledError,
    BusClosedError,
    Event,
    EventBus,
    EventType,
    InMemoryEventBus,
    Subscription,
    create_event_bus,
)
from django_eventbus.events.backoff import backoff_delays
from django_eventbus.events.bus import parse_bus_url
from django_eventbus.events.codec import dumps_event, loads_event


def test_event_types_have_the_guides_seven_values() -> None:
    assert [t.value for t in EventType] == [
        "created",
        "updated",
        "deleted",
        "activated",
        "deactivated",
        "error",
        "custom",
    ]


def test_event_defaults() -> None:
    before = datetime.now(timezone.utc)
    event = Event(type=EventType.CREATED, topic="t", payload={"a": 1})
    assert before <= event.timestamp <= datetime.now(timezone.utc)
    assert event.timestamp.tzinfo is not None
    assert len(event.event_id) == 36 and event.id == event.event_id
    assert event.source is None and event.correlation_id is None and event.metadata == {}
    assert Event(type=EventType.CREATED, topic="t").event_id != event.event_id


def test_event_is_immutable_and_shares_no_dicts() -> None:
    payload: dict[str, Any] = {"items": [1, 2], "nested": {"k": "v"}}
    event = Event(type=EventType.CREATED, topic="t", payload=payload, metadata={"m": [1]})
    payload["items"].append(3)
    payload["nested"]["k"] = "changed"
    assert event.payload == {"items": [1, 2], "nested": {"k": "v"}}  # deep copy at construction
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.topic = "x"  # type: ignore[misc]
    with pytest.raises(TypeError, match="read-only"):
        event.payload["new"] = 1  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        event.payload["items"].append(4)
    with pytest.raises(TypeError, match="read-only"):
        event.metadata["m"].clear()
    copied = event.with_correlation("c-1")
    assert copied.correlation_id == "c-1" and event.correlation_id is None
    assert copied.event_id == event.event_id
    # copies of the frozen containers are fine to mutate
    mutable = dict(event.payload)
    mutable["x"] = 1
    assert "x" not in event.payload
    assert copy.deepcopy(event) == event
    assert pickle.loads(pickle.dumps(event)) == event
    assert hash(event) == hash(copied)


def test_to_dict_from_dict_round_trips_every_field_through_json() -> None:
    event = Event(
        type=EventType.UPDATED,
        topic="registry:bots",
        payload={"bot_id": "b1", "config": {"x": [1, 2.5, None, True]}},
        timestamp=datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
        source="worker:1",
        correlation_id="req-9",
        metadata={"attempt": 2},
    )
    data = json.loads(json.dumps(event.to_dict()))
    assert data["type"] == "updated"
    back = Event.from_dict(data)
    assert back == event
    assert back.timestamp == event.timestamp and back.timestamp.utcoffset() == timedelta(hours=2)
    assert loads_event(dumps_event(event)) == event


@pytest.mark.parametrize(
    "bad",
    [
        '{"type": "nope", "topic": "t"}',
        '{"topic": "t"}',
        "[1, 2]",
        "not json",
        b"\xff\xfe",
        '{"type": "created"}',
    ],
)
def test_malformed_wire_data_is_a_value_error(bad: str | bytes) -> None:
    with pytest.raises(ValueError):
        loads_event(bad)


def test_event_type_from_string_and_bad_fields() -> None:
    assert Event(type="created", topic="t").type is EventType.CREATED  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Event(type="nope", topic="t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topic"):
        Event(type=EventType.CREATED, topic="")
    with pytest.raises(TypeError, match="payload must be a dict"):
        Event(type=EventType.CREATED, topic="t", payload=[1])  # type: ignore[arg-type]


def test_naive_timestamp_is_taken_as_utc() -> None:
    event = Event(type=EventType.CREATED, topic="t", timestamp=datetime(2026, 1, 1, 12, 0))
    assert event.timestamp == datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


async def test_subscription_fields_and_idempotent_cancel() -> None:
    bus = InMemoryEventBus()
    await bus.connect()
    got: list[Event] = []
    sub = await bus.subscribe("t", got.append)
    assert isinstance(sub, Subscription)
    assert sub.topic == "t" and sub.pattern is None and sub.subscription_id and sub.created_at.tzinfo
    pat = await bus.subscribe("all", got.append, pattern="*")
    assert pat.pattern == "*"
    await sub.cancel()
    await sub.cancel()
    await bus.publish("t", Event(type=EventType.CREATED, topic="t"))
    assert len(got) == 1  # only the pattern subscription
    await bus.close()


def test_backends_satisfy_the_protocol() -> None:
    assert isinstance(InMemoryEventBus(), EventBus)
    assert isinstance(create_event_bus({"backend": "memory"}), InMemoryEventBus)


def test_factory_accepts_urls_and_dotted_paths() -> None:
    assert isinstance(create_event_bus("memory://"), InMemoryEventBus)
    assert parse_bus_url("redis://:pw@h:1/2") == {"backend": "redis", "url": "redis://:pw@h:1/2"}
    assert parse_bus_url("rediss://h") == {"backend": "redis", "url": "rediss://h"}
    assert parse_bus_url("postgres://u@h/db")["backend"] == "postgres"
    assert parse_bus_url("postgres://") == {"backend": "postgres"}  # Django's own database
    assert parse_bus_url("postgresql://u@h/db") == {
        "backend": "postgres",
        "connection_string": "postgresql://u@h/db",
    }
    bus = create_event_bus({"backend": "django_eventbus.events.memory.InMemoryEventBus"})
    assert isinstance(bus, InMemoryEventBus)


def test_unknown_backend_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'memory', 'postgres', 'redis'"):
        create_event_bus({"backend": "kafka"})
    with pytest.raises(ValueError, match="unknown event bus URL scheme 'kafka'"):
        create_event_bus("kafka://x")
    with pytest.raises(ValueError, match='"backend" key'):
        create_event_bus(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid options for the 'memory'"):
        create_event_bus({"backend": "memory", "bogus": 1})
    with pytest.raises(ImportError, match="cannot import"):
        create_event_bus({"backend": "no.such.Backend"})


def test_missing_client_package_names_the_extra() -> None:
    # In a subprocess where psycopg and redis cannot be imported.
    code = """
import sys
sys.modules['psycopg'] = None
sys.modules['redis'] = None
from django_eventbus.events import create_event_bus, BackendNotInstalledError
for name, extra in [('postgres', 'postgres'), ('redis', 'redis')]:
    try:
        create_event_bus({'backend': name})
    except BackendNotInstalledError as exc:
        assert isinstance(exc, ImportError)
        assert f"pip install 'django-eventbus[{extra}]'" in str(exc), exc
    else:
        raise SystemExit('no error for ' + name)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    assert issubclass(BackendNotInstalledError, ImportError)


def test_core_imports_no_django() -> None:
    code = """
import sys
import django_eventbus.events as core
from django_eventbus.events import memory, bus, codec, dispatch, base, types, backoff, errors
try:
    import django_eventbus.events.postgres, django_eventbus.events.redis
except ImportError:
    pass
bad = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))
print(','.join(bad) or 'clean')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "clean"


async def test_memory_publish_awaits_sync_and_async_handlers() -> None:
    bus = create_event_bus({"backend": "memory"})
    await bus.connect()
    order: list[str] = []

    async def slow_async(event: Event) -> None:
        await asyncio.sleep(0.01)
        order.append("async")

    def sync(event: Event) -> None:
        order.append("sync")

    await bus.subscribe("t", slow_async)
    await bus.subscribe("t", sync)
    await bus.publish("t", Event(type=EventType.CREATED, topic="t"))
    assert order == ["async", "sync"]  # both ran, in subscription order, before publish returned
    await bus.close()


async def test_memory_pattern_is_case_sensitive_fnmatch() -> None:
    bus = InMemoryEventBus()
    await bus.connect()
    got: list[str] = []
    await bus.subscribe("p", lambda e: got.append(e.topic), pattern="registry:b?ts")
    await bus.subscribe("q", lambda e: got.append("Q:" + e.topic), pattern="[kr]*:*")
    for topic in ["registry:bots", "registry:bats", "Registry:bots", "knowledge:x", "registry:bots:config"]:
        await bus.publish(topic, Event(type=EventType.CREATED, topic=topic))
    assert got == [
        "registry:bots",
        "Q:registry:bots",
        "registry:bats",
        "Q:registry:bats",
        "Q:knowledge:x",
        "Q:registry:bots:config",
    ]
    await bus.close()


async def test_publish_before_connect_and_after_close() -> None:
    bus = InMemoryEventBus()
    with pytest.raises(BusClosedError, match="connect"):
        await bus.publish("t", Event(type=EventType.CREATED, topic="t"))
    got: list[Event] = []
    await bus.subscribe("t", got.append)  # subscribing before connect is fine
    await bus.connect()
    await bus.publish("t", Event(type=EventType.CREATED, topic="t"))
    assert len(got) == 1
    await bus.close()
    with pytest.raises(BusClosedError):
        await bus.subscribe("t", got.append)
    with pytest.raises(BusClosedError, match="closed"):
        await bus.connect()


async def test_async_context_manager() -> None:
    async with InMemoryEventBus() as bus:
        got: list[Event] = []
        await bus.subscribe("t", got.append)
        await bus.publish("t", Event(type=EventType.CREATED, topic="t"))
        assert len(got) == 1
    assert bus.state.value == "closed"


def test_backoff_grows_with_jitter_and_caps() -> None:
    delays = backoff_delays(initial=0.1, maximum=1.0)
    values = [next(delays) for _ in range(10)]
    assert 0.05 <= values[0] <= 0.1
    assert 0.1 <= values[1] <= 0.2
    assert all(0.5 <= v <= 1.0 for v in values[5:])
    assert len(set(values)) > 1


def test_the_event_dict_carries_its_schema_version_and_old_dicts_still_read() -> None:
    event = Event(type=EventType.CREATED, topic="t", payload={"a": 1})
    data = event.to_dict()
    assert data["v"] == 1
    without = {k: v for k, v in data.items() if k != "v"}
    assert Event.from_dict(without) == event  # sent before the key existed: version 1
    with pytest.raises(ValueError, match="unsupported schema version v=2"):
        Event.from_dict({**data, "v": 2})


def test_the_documented_chunk_framing_reassembles_a_large_event() -> None:
    # docs/wire-format.md, read as a reader in another language would: split on the
    # documented header, concatenate the pieces, parse.
    from django_eventbus.events.postgres import PostgresEventBus

    event = Event(type=EventType.CREATED, topic="t", payload={"text": "é" * 9000})
    frames = [p for _, p in PostgresEventBus(connection_string="").notifications_for(event)]
    assert len(frames) > 1
    pieces: dict[int, str] = {}
    for frame in frames:
        assert frame.startswith("\x1echunk:")
        index, count, key_length, rest = frame[len("\x1echunk:") :].split(":", 3)
        key, piece = rest[: int(key_length)], rest[int(key_length) :]
        assert key == event.event_id and int(count) == len(frames)
        pieces[int(index)] = piece
    assert Event.from_dict(json.loads("".join(pieces[i] for i in range(len(frames))))) == event
