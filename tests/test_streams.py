"""The log relayed to Redis Streams, and consumed there by consumer groups (real PostgreSQL and Redis).

The relay and the consumers run as ``manage.py`` processes where a test kills them;
elsewhere in this process, against the same streams.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from django.db import connection, transaction

from django_eventbus.delivery.consumers import Consumer
from django_eventbus.delivery.listener import _save_cursor
from django_eventbus.delivery.streams import StreamRelay, StreamTarget, parse_target, partition_of
from django_eventbus.delivery.streams.redis_consumer import StreamGroupConsumer
from django_eventbus.delivery.streams.redis_streams import RedisStreamSink, redis_client
from django_eventbus.events import Event
from django_eventbus.events.codec import loads_event
from django_eventbus.models import StoredEvent
from testproject.inventory.models import Product
from tests.listener_processes import drain as _drain
from tests.orm import orm
from tests.polling import await_until, wait_until
from tests.services import redis_url, require_redis

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis, pytest.mark.postgres]
# XRANGE's reply on a decode_responses client (redis-py's stubs do not know the flag).
XRange = list[tuple[str, dict[str, str]]]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _django_on_postgres() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the stream relay's tests run the Django database on PostgreSQL")


@pytest.fixture
def target_url() -> Iterator[str]:
    """A stream target of its own (a fresh prefix); its keys are deleted afterwards."""
    prefix = f"s{uuid.uuid4().hex[:10]}"
    yield f"redis-streams{require_redis()[5:]}?partitions=4&maxlen=0&prefix={prefix}"
    client = redis.Redis.from_url(redis_url())
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def sink(target_url: str) -> AsyncIterator[RedisStreamSink]:
    created = RedisStreamSink(parse_target(target_url))
    await created.connect()
    yield created
    await created.close()


async def relay_pass(sink: RedisStreamSink) -> StreamRelay:
    """One pass of a stream relay; closes the database connection its pass opened."""
    relay = StreamRelay(sink)
    try:
        await relay.publish_pending()
    finally:
        await relay.stop()
    return relay


def save_keys(keys: int, saves_per_key: int, per_transaction: int = 200) -> list[int]:
    """``keys`` products, each saved ``saves_per_key`` times, named ``<pk>:<n>``; returns the pks."""
    with transaction.atomic():
        products = [Product.objects.create(name="new", stock=10) for _ in range(keys)]
    work = [(p, n) for n in range(1, saves_per_key) for p in products]
    for start in range(0, len(work), per_transaction):
        with transaction.atomic():
            for product, n in work[start : start + per_transaction]:
                product.name = f"{product.pk}:{n}"
                product.save(update_fields=["name"])
    return [p.pk for p in products]


def stream_entries(target: StreamTarget, topic: str) -> dict[int, list[tuple[str, Event]]]:
    """Every entry of a topic's streams, by partition, in stream order."""
    client = redis.Redis.from_url(target.url, decode_responses=True)
    try:
        return {
            p: [(i, loads_event(f["event"])) for i, f in cast(XRange, client.xrange(target.stream(topic, p)))]
            for p in range(target.partitions)
        }
    finally:
        client.close()


def log_ids() -> dict[str, int]:
    return dict(StoredEvent.objects.values_list("event_id", "id"))


def start_command(args: list[str], database: str, ready: str, **env: str) -> subprocess.Popen[str]:
    """``manage.py <args>`` against the test database, once it printed ``ready``; output drained after."""
    process = subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if ready in line:
            break
    else:
        raise AssertionError(f"{args[0]} exited ({process.wait()}): {''.join(seen)[-2000:]}")
    drain = threading.Thread(target=_drain, args=(process.stdout,), daemon=True)
    drain.start()
    _drains[process.pid] = drain
    return process


_drains: dict[int, threading.Thread] = {}


def stop(process: subprocess.Popen[str]) -> None:
    """SIGKILL (if still running) and reap, closing its output pipe."""
    if process.poll() is None:
        process.kill()
    process.wait(20)
    drain = _drains.pop(process.pid, None)
    if drain is not None:
        drain.join(10)  # it closes the pipe at the end of the output


# -- the relay -------------------------------------------------------------------------


async def test_a_relayed_event_reads_back_with_redis_cli(sink: RedisStreamSink) -> None:
    product = await orm(lambda: Product.objects.create(name="plain client", stock=7))
    assert (await relay_pass(sink)).published == 1
    row = await orm(lambda: StoredEvent.objects.get())
    target = sink.target
    stream = target.stream("inventory:product", partition_of(row.to_event(), target.partitions))
    redis_cli = ["redis-cli", "-u", target.url, "--json"]
    out = subprocess.run([*redis_cli, "XRANGE", stream, "-", "+"], capture_output=True, text=True, check=True)
    [[entry_id, fields]] = json.loads(out.stdout)
    assert entry_id == f"{row.id}-0"  # the log id: exactly once, and any reader knows the row
    assert fields[0] == "event" and len(fields) == 2
    data = json.loads(fields[1])
    assert set(data) == {
        "v", "event_id", "type", "topic", "payload", "timestamp", "source", "correlation_id", "metadata"
    }  # fmt: skip
    assert data["v"] == 1
    assert data["event_id"] == row.event_id
    assert data["type"] == "created"
    assert data["topic"] == "inventory:product"
    assert data["payload"]["model"] == "inventory.product"
    assert data["payload"]["pk"] == product.pk
    assert data["payload"]["fields"]["name"] == "plain client"
    assert data["payload"]["fields"]["stock"] == 7
    assert data["payload"]["fields"]["price"] == "0.00"
    assert data["timestamp"] == row.timestamp.isoformat()
    assert data["source"] == row.source
    assert data["correlation_id"] is None
    assert data["metadata"] == row.metadata
    topics_key = f"{target.prefix}:topics"
    topics = subprocess.run([*redis_cli, "SMEMBERS", topics_key], capture_output=True, text=True, check=True)
    assert json.loads(topics.stdout) == ["inventory:product"]


async def test_a_batch_sent_again_after_a_crash_is_refused_entry_by_entry(sink: RedisStreamSink) -> None:
    await orm(lambda: save_keys(20, 3))
    relay = await relay_pass(sink)
    assert relay.published == 60
    # A crash between the XADDs and the cursor save: the cursor is still before the batch.
    await orm(lambda: _save_cursor(relay.name, 0, []))
    again = await relay_pass(sink)
    assert (again.published, again.skipped) == (60, 60)
    entries = await asyncio.to_thread(stream_entries, sink.target, "inventory:product")
    assert sum(len(e) for e in entries.values()) == 60


async def test_a_cursor_below_the_pruned_log_continues_from_the_oldest_row(
    sink: RedisStreamSink, caplog: pytest.LogCaptureFixture
) -> None:
    await orm(lambda: save_keys(5, 1))
    relay = await relay_pass(sink)

    def prune_and_write() -> None:
        save_keys(3, 1)
        newest = StoredEvent.objects.order_by("-id")[:3]
        StoredEvent.objects.exclude(id__in=[e.id for e in newest]).delete()
        StoredEvent.objects.filter(id=min(e.id for e in newest)).delete()  # pruned before relayed
        _save_cursor(relay.name, 1, [])

    await orm(prune_and_write)
    assert (await relay_pass(sink)).published == 2
    assert "were pruned before they were relayed" in caplog.text
    entries = await asyncio.to_thread(stream_entries, sink.target, "inventory:product")
    assert sum(len(e) for e in entries.values()) == 7


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_10000_saves_with_the_relay_sigkilled_twice_reach_the_streams_once_in_log_order(
    target_url: str, shared_database: str
) -> None:
    target = parse_target(target_url)
    client = redis.Redis.from_url(target.url)

    def relayed() -> int:
        return sum(client.xlen(target.stream("inventory:product", p)) for p in range(target.partitions))

    relay_args = ["eventbus_relay", "--to", target_url, "--interval", "0.05", "--batch-size", "500"]
    process = start_command(relay_args, shared_database, "relaying the event log")
    writer = threading.Thread(
        target=asyncio.run, args=(orm(lambda: save_keys(500, 20, per_transaction=100)),)
    )
    try:
        writer.start()
        for kill_at in (3000, 6500):
            wait_until(lambda k=kill_at: relayed() >= k, timeout=60, what=f"{kill_at} entries")  # type: ignore[misc]
            stop(process)  # SIGKILL
            process = start_command(relay_args, shared_database, "relaying the event log")
        writer.join(120)
        wait_until(lambda: relayed() >= 10_000, timeout=60, what="10,000 entries")
        time.sleep(0.5)  # a relay that would add a copy would have done it by now
    finally:
        stop(process)
        client.close()
    entries = stream_entries(target, "inventory:product")
    ids = log_ids()
    assert len(ids) == 10_000
    seen: list[str] = []
    for partition, items in entries.items():
        positions = [int(entry_id.split("-")[0]) for entry_id, _ in items]
        assert positions == sorted(positions)  # log order in each partition
        for (entry_id, event), position in zip(items, positions, strict=True):
            assert ids[event.event_id] == position  # entry n is log row n
            assert partition_of(event, target.partitions) == partition
            assert entry_id == f"{position}-0"
        seen += [event.event_id for _, event in items]
    assert len(seen) == 10_000 and set(seen) == set(ids)  # each event once


def test_the_relay_command_is_woken_by_the_bus_not_its_poll(
    target_url: str, shared_database: str, use_bus: Any
) -> None:
    bus = use_bus("redis")["BUS"]
    target = parse_target(target_url)
    relay_args = ["eventbus_relay", "--to", target_url, "--interval", "60"]
    env = {"EVENTBUS_URL": bus["url"], "EVENTBUS_CHANNEL_PREFIX": bus["channel_prefix"]}
    Product.objects.create(name="before", stock=10)
    process = start_command(relay_args, shared_database, "relaying the event log", **env)
    client = redis.Redis.from_url(target.url)

    def relayed() -> int:
        return sum(client.xlen(target.stream("inventory:product", p)) for p in range(4))

    try:
        wait_until(lambda: relayed() == 1, timeout=20, what="the first pass")  # now it waits
        start = time.monotonic()
        Product.objects.create(name="live", stock=10)
        wait_until(lambda: relayed() == 2, timeout=20, what="the relayed event")
        elapsed = time.monotonic() - start
    finally:
        stop(process)
        client.close()
    assert elapsed < 5.0, elapsed  # the poll would take 60 s


# -- consumer groups -------------------------------------------------------------------


def pending_on(target: StreamTarget, group: str, member: str) -> int:
    client = redis.Redis.from_url(target.url, decode_responses=True)
    try:
        return sum(
            len(client.xpending_range(target.stream("inventory:product", p), group, "-", "+", 10_000, member))
            for p in range(target.partitions)
        )
    finally:
        client.close()


def owners(target: StreamTarget, group: str) -> list[str | None]:
    client = redis.Redis.from_url(target.url, decode_responses=True)
    try:
        keys = [f"{target.prefix}:owner:{group}:{target.stream('inventory:product', p)}" for p in range(4)]
        return cast("list[str | None]", client.mget(keys))
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_consumer_processes_one_sigkilled_every_event_handled_in_key_order(
    target_url: str, shared_database: str, tmp_path: Path
) -> None:
    target = parse_target(target_url)
    sink = RedisStreamSink(target)
    await sink.connect()
    try:
        pks = await orm(lambda: save_keys(100, 20))
        assert (await relay_pass(sink)).published == 2000
    finally:
        await sink.close()
    record = tmp_path / "record"
    args = ["eventbus_stream_consumer", "--from", target_url, "--claim-idle", "1.5", "--count", "5"]
    members = ["alive", "doomed"]
    processes = await asyncio.gather(
        *(
            asyncio.to_thread(
                start_command,
                [*args, "--member", member],
                shared_database,
                "consuming",
                EVENTBUS_RECORD_TO=str(record),
                EVENTBUS_RECORD_DELAY="0.004",
            )
            for member in members
        )
    )
    group = "inventory.recorder"

    def lines() -> int:
        return len(record.read_text().splitlines()) if record.exists() else 0

    try:
        # The members share the four partitions: two each.
        await await_until(
            lambda: sorted(map(str, owners(target, group))) == ["alive", "alive", "doomed", "doomed"],
            timeout=20,
            what="two partitions each",
        )
        split_at = lines()
        await await_until(lambda: lines() >= split_at + 200, timeout=30, what="both members at work")
        assert lines() < 1500, "too late to kill a member in the middle"
        await asyncio.to_thread(stop, processes[1])  # SIGKILL
        in_flight = await asyncio.to_thread(pending_on, target, group, "doomed")
        assert in_flight <= 2 * 5  # two streams, --count 5 each

        def handled() -> int:
            return len({line.split(" ")[0] for line in record.read_text().splitlines()})

        await await_until(lambda: handled() >= 2000, timeout=60, what="every event handled")
        await await_until(lambda: owners(target, group) == ["alive"] * 4, timeout=10, what="a takeover")
    finally:
        for process in processes:
            await asyncio.to_thread(stop, process)
    records = [line.split(" ") for line in record.read_text().splitlines()]
    counts = Counter(event_id for event_id, _, _ in records)
    duplicates = sum(n - 1 for n in counts.values())
    print(f"duplicates: {duplicates} (entries pending on the killed member: {in_flight})")
    assert len(counts) == 2000
    assert duplicates <= in_flight
    by_key: dict[str, list[int]] = defaultdict(list)
    for _, name, _ in records:
        if name != "new":
            key, n = name.split(":")
            by_key[key].append(int(n))
    assert set(by_key) == {str(pk) for pk in pks}
    for key, sequence in by_key.items():
        assert sequence == sorted(sequence), key  # per-key order (a repeat follows its first time)


async def test_a_poison_event_goes_to_the_dead_letter_stream_and_the_others_continue(
    sink: RedisStreamSink,
) -> None:
    pks = await orm(lambda: save_keys(12, 1))
    poison_pk = pks[5]
    handled: list[Any] = []

    def handle(event: Event) -> None:
        if event.payload["pk"] == poison_pk:
            raise RuntimeError("poison")
        handled.append(event.payload["pk"])

    await relay_pass(sink)
    consumer = Consumer(name="poison-test", pattern="inventory:*", func=handle, retries=2, retry_delay=0.01)
    client = redis_client(sink.target)
    member = StreamGroupConsumer(client, sink.target, consumer, member="one", claim_idle=2.0)
    stop_event = asyncio.Event()
    task = asyncio.create_task(member.run(stop_event))
    dead_key = f"{sink.target.prefix}:dead:poison-test"
    try:
        await await_until(lambda: len(handled) == 11, timeout=20, what="the other events handled")
        await await_until(lambda: member.dead_lettered == 1, timeout=20, what="the dead letter")
        stop_event.set()
        await asyncio.wait_for(task, 10)
        [(_, fields)] = await client.xrange(dead_key)
        assert loads_event(fields["event"]).payload["pk"] == poison_pk
        assert fields["deliveries"] == "3"  # the first delivery and two retries
        assert "RuntimeError: poison" in fields["error"]
        assert fields["stream"].startswith(f"{sink.target.prefix}:inventory:product:")
        for p in range(4):
            summary = await client.xpending(sink.target.stream("inventory:product", p), "poison-test")
            assert summary["pending"] == 0  # acknowledged: the stream moved on
    finally:
        stop_event.set()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
    assert sorted(handled) == sorted(pk for pk in pks if pk != poison_pk)


def test_stream_target_urls() -> None:
    target = parse_target("redis-streams://:secret@db.internal:6380/2?partitions=8&maxlen=500&prefix=shop")
    assert target.url == "redis://:secret@db.internal:6380/2"
    assert (target.partitions, target.maxlen, target.prefix) == (8, 500, "shop")
    assert target.cursor_name == "django_eventbus.streams:redis-streams://db.internal:6380/2?prefix=shop"
    assert "secret" not in target.cursor_name
    assert parse_target("rediss-streams://h/0").url == "rediss://h/0"
    for bad in ("nats://h", "redis-streams://h/0?partitions=0", "redis-streams://h/0?shards=2"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_partition_follows_the_model_pk_else_the_event_id() -> None:
    a = Event(type="created", topic="t", payload={"pk": 41})  # type: ignore[arg-type]
    b = Event(type="updated", topic="t", payload={"pk": 41, "changed": {}})  # type: ignore[arg-type]
    assert partition_of(a, 16) == partition_of(b, 16)
    import zlib

    assert partition_of(a, 16) == zlib.crc32(b"41") % 16  # what another language computes
    c = Event(type="custom", topic="t", payload={"n": 1})  # type: ignore[arg-type]
    assert partition_of(c, 16) == zlib.crc32(json.dumps(c.event_id).encode()) % 16


@pytest.mark.parametrize(
    "setting",
    [
        {"STREAMS": "kafka://broker:9092"},
        {"STREAMS": "redis-streams://h/0?partitions=x"},
        {"STREAMS": "redis-streams://h/0", "STREAM_CLAIM_IDLE": 0},
    ],
)
def test_stream_settings_are_checked(setting: dict[str, Any]) -> None:
    from django.test import override_settings

    from django_eventbus.checks import check_settings

    with override_settings(EVENTBUS=setting):
        [error] = check_settings()
    assert error.hint is not None
    assert error.id == "django_eventbus.E017" and "docs/streams.md" in error.hint
    with override_settings(EVENTBUS={"STREAMS": "redis-streams://h/0?partitions=2", "STREAM_CLAIM_IDLE": 5}):
        assert check_settings() == []
