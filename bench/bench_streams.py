"""Stream benchmarks: the relay from the log to Redis Streams, and consumer-group throughput.

    python bench/bench_streams.py [--quick] [--events N] [--processes 1,2,4] [--saves N]

1. Relay: N events in the log (PostgreSQL, pks spread over 4 partitions); one
   ``StreamRelay`` pass (read the log in batches of 5,000, encode, pipelined
   ``XADD`` with the log id as entry id, cursor saved per batch), events/s.
   Baseline in the same run: raw redis-py pipelined ``XADD`` (auto ids, 5,000 a
   pipeline) of the same events already encoded — the transport alone.
   Target >= 20,000/s.
2. Consumer groups: the relayed streams read by 1, 2 and 4 processes, each a
   ``StreamGroupConsumer`` member with a no-op async consumer (per-key order:
   partition leases, one ``XACK`` per read of 10); beside raw ``XREADGROUP`` + one
   ``XACK`` per batch of 100 in the same number of processes (no per-key order).
3. Latency: ``create()`` here -> ``eventbus_relay`` process (woken by the Redis
   bus) -> stream -> ``eventbus_stream_consumer`` process, paced saves, p50/p99.

Database: ``eventbus_bench`` on the local server (created if missing); Redis: ``REDIS_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_listener import PG_DSN, REDIS_URL, ensure_database, percentile  # noqa: E402  (sets DATABASE_URL)

if TYPE_CHECKING:
    from redis.typing import KeyT, StreamIdT

PARTITIONS = 4
TOPIC = "inventory:product"
# XREADGROUP's reply on a decode_responses client (redis-py's stubs do not know the flag).
Reply = list[tuple[str, list[tuple[str, dict[str, str]]]]] | None


def fill_log(n: int) -> None:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute("TRUNCATE django_eventbus_event, django_eventbus_cursor RESTART IDENTITY")
        # ~300-byte payloads, one pk per row: the events spread over the partitions.
        conn.execute(
            """INSERT INTO django_eventbus_event (event_id, type, topic, payload, timestamp, source, metadata)
               SELECT gen_random_uuid()::text, 'created', %s,
                      jsonb_build_object('model', 'inventory.product', 'pk', i,
                        'fields', jsonb_build_object('name', repeat('x', 200), 'price', '19.99', 'stock', 7)),
                      now() - interval '1 hour', 'bench', '{}'::jsonb
               FROM generate_series(1, %s) AS i""",
            [TOPIC, n],
        )
        conn.execute("ANALYZE django_eventbus_event")


def delete_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


async def our_relay(prefix: str) -> tuple[float, int]:
    from django_eventbus.delivery.streams import StreamRelay, parse_target
    from django_eventbus.delivery.streams.redis_streams import RedisStreamSink

    target = parse_target(f"redis-streams{REDIS_URL[5:]}?partitions={PARTITIONS}&maxlen=0&prefix={prefix}")
    sink = RedisStreamSink(target)
    await sink.connect()
    relay = StreamRelay(sink)
    try:
        start = time.perf_counter()
        count = await relay.publish_pending()
        elapsed = time.perf_counter() - start
    finally:
        await relay.stop()
        await sink.close()
    return count / elapsed, count


async def raw_xadd(prefix: str, n: int, batch: int = 5000) -> float:
    import redis.asyncio as aioredis

    from django_eventbus.delivery.streams import partition_of
    from django_eventbus.events.codec import dumps_event
    from django_eventbus.models import StoredEvent

    rows = await asyncio.to_thread(lambda: [e.to_event() for e in StoredEvent.objects.order_by("id")[:n]])
    encoded = [(f"{prefix}:{e.topic}:{partition_of(e, PARTITIONS)}", dumps_event(e)) for e in rows]
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        start = time.perf_counter()
        for offset in range(0, len(encoded), batch):
            pipe = client.pipeline(transaction=False)
            for stream, data in encoded[offset : offset + batch]:
                pipe.xadd(stream, {"event": data})
            await pipe.execute()
        elapsed = time.perf_counter() - start
    finally:
        await client.aclose()
    return len(encoded) / elapsed


# -- consumer groups (each member its own process) --------------------------------------


def _our_member(prefix: str, group: str, index: int, go: Any, done: Any, counter: Any, total: int) -> None:
    import django

    django.setup()
    from django_eventbus.delivery.consumers import Consumer
    from django_eventbus.delivery.streams import parse_target
    from django_eventbus.delivery.streams.redis_consumer import StreamGroupConsumer
    from django_eventbus.delivery.streams.redis_streams import redis_client

    target = parse_target(f"redis-streams{REDIS_URL[5:]}?partitions={PARTITIONS}&prefix={prefix}")

    async def run() -> None:
        client = redis_client(target)
        stop = asyncio.Event()
        handled = 0

        async def handle(_event: Any) -> None:
            nonlocal handled
            handled += 1
            if handled % 100 == 0:
                with counter.get_lock():
                    counter.value += 100

        consumer = Consumer(name=group, pattern=TOPIC, func=handle)
        member = StreamGroupConsumer(client, target, consumer, member=f"m{index}", claim_idle=1.5)
        go.wait()
        task = asyncio.create_task(member.run(stop))
        while not done.is_set():
            await asyncio.sleep(0.01)
        stop.set()
        await task
        await client.aclose()

    asyncio.run(run())


def _raw_member(prefix: str, group: str, index: int, go: Any, done: Any, counter: Any, total: int) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    streams: dict[KeyT, StreamIdT] = {f"{prefix}:{TOPIC}:{p}": ">" for p in range(PARTITIONS)}
    go.wait()
    while not done.is_set():
        reply = cast(Reply, client.xreadgroup(group, f"m{index}", streams, count=100, block=100))
        for stream, entries in reply or []:
            if entries:
                client.xack(stream, group, *[entry_id for entry_id, _ in entries])
                with counter.get_lock():
                    counter.value += len(entries)
    client.close()


def group_throughput(kind: str, prefix: str, processes: int, total: int) -> float:
    import redis

    group = f"bench-{kind}-{processes}-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(REDIS_URL)
    for p in range(PARTITIONS):
        client.xgroup_create(f"{prefix}:{TOPIC}:{p}", group, id="0", mkstream=True)
    client.close()
    context = multiprocessing.get_context("fork")
    go, done, counter = context.Event(), context.Event(), context.Value("q", 0)
    target = _our_member if kind == "ours" else _raw_member
    workers = [
        context.Process(target=target, args=(prefix, group, i, go, done, counter, total))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    time.sleep(3.0)  # imports and django.setup() in the children, before the clock starts
    start = time.perf_counter()
    go.set()
    # ours counts in hundreds: the last < 100 per member may not show
    while counter.value < total - 100 * processes:
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    done.set()
    for worker in workers:
        worker.join(30)
    return float(counter.value / elapsed)


# -- save -> stream consumer ---------------------------------------------------------------


def _started(args: list[str], env: dict[str, str], marker: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    while marker not in process.stderr.readline():
        if process.poll() is not None:
            raise RuntimeError(f"{args[0]} exited with {process.returncode}")
    return process


def _wait_for_lines(path: Path, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(path.read_text().splitlines()) < count and time.monotonic() < deadline:
        time.sleep(0.02)


def stream_latency(prefix: str, saves: int, pace: float) -> list[float]:
    """Seconds from ``create()`` to the recorder consumer in an ``eventbus_stream_consumer``
    process, through an ``eventbus_relay`` process woken by the Redis bus."""
    import psycopg
    from django.conf import settings
    from django.test.utils import override_settings

    from django_eventbus.delivery.runtime import reset_runner
    from django_eventbus.events.bus import parse_bus_url
    from testproject.inventory.models import Product

    with psycopg.connect(PG_DSN, autocommit=True) as conn:  # the relay would send the whole log first
        conn.execute("TRUNCATE django_eventbus_event, django_eventbus_cursor RESTART IDENTITY")
    url = f"redis-streams{REDIS_URL[5:]}?partitions={PARTITIONS}&prefix={prefix}"
    record = Path(tempfile.mkstemp(suffix=".txt")[1])
    env = {**os.environ, "EVENTBUS_URL": REDIS_URL, "EVENTBUS_CHANNEL_PREFIX": prefix}
    env.update(EVENTBUS_RECORD_TO=str(record), PYTHONUNBUFFERED="1")
    processes = [
        _started(["eventbus_relay", "--to", url], env, "relaying"),
        _started(["eventbus_stream_consumer", "--from", url], env, "consuming"),
    ]
    sent: dict[str, float] = {}
    try:
        bus = {**parse_bus_url(REDIS_URL), "channel_prefix": prefix}
        with override_settings(EVENTBUS={**settings.EVENTBUS, "BUS": bus}):
            # A first event before timing: the consumer finds the topic's streams (checked every second).
            Product.objects.create(name="warm-up", stock=10)
            _wait_for_lines(record, 1)
            for i in range(saves):
                sent[f"lat{i}"] = time.time()
                Product.objects.create(name=f"lat{i}", stock=10)
                time.sleep(pace)
            _wait_for_lines(record, saves + 1)
        reset_runner()
    finally:
        for process in processes:
            process.terminate()
            process.wait(20)
            assert process.stderr is not None
            process.stderr.close()
    lines = [line.split(" ") for line in record.read_text().splitlines()]
    received = {name: float(at) for _, name, at in lines}
    record.unlink()
    return [received[name] - at for name, at in sent.items() if name in received]


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--saves", type=int, default=500, help="paced saves for the latency")
    parser.add_argument("--quick", action="store_true", help="20,000 events, 200 saves")
    args = parser.parse_args()
    if args.quick:
        args.events, args.saves = 20_000, 200
    ensure_database()
    os.environ.setdefault("EVENTBUS_LOG", "WARNING")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    prefix = f"bench{uuid.uuid4().hex[:6]}"
    raw_prefix = f"{prefix}raw"
    try:
        print(f"== relay: {args.events:,} logged events -> Redis Streams, {PARTITIONS} partitions")
        fill_log(args.events)
        raw = asyncio.run(raw_xadd(raw_prefix, args.events))
        ours, count = asyncio.run(our_relay(prefix))
        assert count == args.events, count
        print(f"{'':52}{'events/s':>12}{'ratio':>8}")
        print(f"{'raw redis-py pipelined XADD (encoded, 5000/pipe)':52}{raw:>12,.0f}{1.0:>8.2f}")
        print(f"{'ours: StreamRelay pass (read log, encode, XADD)':52}{ours:>12,.0f}{ours / raw:>8.2f}")
        print("target >= 20,000/s")

        print(f"\n== consumer groups: {args.events:,} entries, no-op consumer")
        header = f"{'raw XREADGROUP+XACK/100':>26}{'ours (leases, XACK per read)':>30}"
        print(f"{'processes':>10}{header}{'ratio':>8}")
        for processes in [int(p) for p in args.processes.split(",") if p]:
            raw_rate = group_throughput("raw", prefix, processes, args.events)
            our_rate = group_throughput("ours", prefix, processes, args.events)
            print(f"{processes:>10}{raw_rate:>26,.0f}{our_rate:>30,.0f}{our_rate / raw_rate:>8.2f}")

        if args.saves:
            print(f"\n== create() -> relay -> stream -> consumer, processes, {args.saves} saves 10 ms apart")
            ms = [v * 1000 for v in stream_latency(f"{prefix}lat", args.saves, 0.01)]
            print(f"received {len(ms)} of {args.saves}; p50 {percentile(ms, 0.5):.2f} ms, "
                  f"p99 {percentile(ms, 0.99):.2f} ms, max {max(ms):.2f} ms")  # fmt: skip
    finally:
        for name in (prefix, raw_prefix, f"{prefix}lat"):
            delete_prefix(name)


if __name__ == "__main__":
    main()
