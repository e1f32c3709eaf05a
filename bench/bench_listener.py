"""Listener benchmarks: catch-up throughput, and model save -> consumer latency across processes.

    python bench/bench_listener.py [--quick] [--catchup-events N] [--saves N]

1. Catch-up: N events in the log (PostgreSQL), a durable no-op consumer starting
   at 0; events/s with the default settings (the cursor saved every 1,000 events
   or 1 s during catch-up, under the consumer's lease) and with
   ``checkpoint_every=1`` (a save per event). Baseline: raw psycopg reading the
   same rows in the same batches and decoding their JSON. Target >= 20,000/s.
2. End to end: ``Product.objects.create()`` in this process -> a consumer in a
   ``manage.py eventbus_listen`` process, paced, p50/p99, on the postgres bus
   (Django's database) and on redis; beside it the raw client's latency in the
   same run (psycopg pg_notify -> LISTEN; redis PUBLISH -> SUBSCRIBE). Target p99 < 5 ms.

Database: ``eventbus_bench`` on the local server (created if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DB_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/eventbus_bench")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ["DATABASE_URL"] = DB_URL
os.environ["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
PG_DSN = DB_URL.replace("postgres://", "postgresql://", 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ensure_database() -> None:
    import psycopg

    name = DB_URL.rsplit("/", 1)[1]
    admin = PG_DSN.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))


def fill_log(n: int) -> None:
    import psycopg

    payload = (
        '{"model": "inventory.product", "pk": 1, "fields": {"name": "%s", "price": "19.99", "stock": 7}}'
        % ("x" * 200)
    )
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute("TRUNCATE django_eventbus_event, django_eventbus_cursor RESTART IDENTITY")
        conn.execute(
            """INSERT INTO django_eventbus_event (event_id, type, topic, payload, timestamp, source, metadata)
               SELECT gen_random_uuid()::text, 'created', 'inventory:product', %s::jsonb,
                      now() - interval '1 hour', 'bench', '{}'::jsonb
               FROM generate_series(1, %s)""",
            [payload, n],
        )
        conn.execute("ANALYZE django_eventbus_event")


def raw_catchup(n: int, batch: int = 5000) -> float:
    import json

    import psycopg

    with psycopg.connect(PG_DSN) as conn:
        start = time.perf_counter()
        position, count = 0, 0
        while True:
            rows = conn.execute(
                "SELECT id, event_id, type, topic, payload::text, timestamp FROM django_eventbus_event "
                "WHERE id > %s ORDER BY id LIMIT %s",
                [position, batch],
            ).fetchall()
            if not rows:
                break
            for row in rows:
                json.loads(row[4])
            position = rows[-1][0]
            count += len(rows)
        elapsed = time.perf_counter() - start
    assert count == n
    return n / elapsed


def our_catchup(n: int, **options: Any) -> float:
    from django_eventbus.delivery.consumers import Consumer
    from django_eventbus.delivery.listener import Listener
    from django_eventbus.events import BaseEventBus, create_event_bus
    from django_eventbus.models import ConsumerCursor

    ConsumerCursor.objects.all().delete()
    count = 0

    def noop(event: Any) -> None:
        nonlocal count
        count += 1

    async def run() -> float:
        bus = cast(BaseEventBus, create_event_bus({"backend": "memory"}))  # the log is measured, not the bus
        await bus.connect()
        # An async no-op: a sync consumer adds a thread hop per event (measured separately).
        consumer = Consumer(name="bench.noop", pattern="inventory:*", func=_async(noop), **options)
        listener = Listener(bus, [consumer], start_after=0, interval=3600)
        start = time.perf_counter()
        await listener.start()
        elapsed = time.perf_counter() - start
        await listener.stop()
        await bus.close()
        return elapsed

    elapsed = asyncio.run(run())
    assert count == n, (count, n)
    return n / elapsed


def _async(func: Any) -> Any:
    async def call(event: Any) -> None:
        func(event)

    return call


async def raw_pg_latency(count: int, pace: float) -> list[float]:
    import psycopg

    listener = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    sender = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    await listener.execute("LISTEN bench_raw")
    latencies: list[float] = []

    async def receive() -> None:
        async for note in listener.notifies():
            latencies.append(time.perf_counter() - float(note.payload.split(" ", 1)[0]))
            if len(latencies) == count:
                break

    task = asyncio.create_task(receive())
    for _ in range(count):
        await sender.execute("SELECT pg_notify('bench_raw', %s)", [f"{time.perf_counter()} " + "x" * 280])
        await asyncio.sleep(pace)
    await asyncio.wait_for(task, 30)
    await listener.close()
    await sender.close()
    return latencies


async def raw_redis_latency(count: int, pace: float) -> list[float]:
    import redis.asyncio as aioredis

    sub_client = aioredis.Redis.from_url(REDIS_URL)
    pub_client = aioredis.Redis.from_url(REDIS_URL)
    pubsub = sub_client.pubsub()
    await pubsub.subscribe("bench_raw")
    latencies: list[float] = []

    async def receive() -> None:
        while len(latencies) < count:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message:
                latencies.append(time.perf_counter() - float(message["data"].split(b" ", 1)[0]))

    task = asyncio.create_task(receive())
    for _ in range(count):
        await pub_client.publish("bench_raw", f"{time.perf_counter()} " + "x" * 280)
        await asyncio.sleep(pace)
    await asyncio.wait_for(task, 30)
    await pubsub.aclose()
    await sub_client.aclose()
    await pub_client.aclose()
    return latencies


def our_e2e_latency(bus: str, count: int, pace: float) -> tuple[list[float], list[float]]:
    """(save -> consumer latencies, save durations) with a real listener process."""
    from django.conf import settings
    from django.test.utils import override_settings

    from django_eventbus.delivery.runtime import get_runner, reset_runner
    from django_eventbus.events.bus import parse_bus_url
    from testproject.inventory.models import Product

    prefix = f"bench{os.getpid()}"
    url = "postgres://" if bus == "postgres" else REDIS_URL
    record = Path(tempfile.mkstemp(suffix=".txt")[1])
    env = {
        **os.environ,
        "EVENTBUS_URL": url,
        "EVENTBUS_CHANNEL_PREFIX": prefix,
        "EVENTBUS_RECORD_TO": str(record),
        "PYTHONUNBUFFERED": "1",
    }
    listener = subprocess.Popen(
        [sys.executable, "manage.py", "eventbus_listen"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sent: dict[str, float] = {}
    durations: list[float] = []
    try:
        assert listener.stderr is not None
        for line in listener.stderr:
            if "listening on" in line:
                break
        config = {**settings.EVENTBUS, "BUS": {**parse_bus_url(url), "channel_prefix": prefix}}
        with override_settings(EVENTBUS=config):
            get_runner().bus  # noqa: B018 - connect before timing
            for i in range(count):
                name = f"lat{i}"
                start_wall, start = time.time(), time.perf_counter()
                sent[name] = start_wall
                Product.objects.create(name=name, stock=10)
                durations.append(time.perf_counter() - start)
                time.sleep(pace)
            get_runner().flush()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if len(record.read_text().splitlines()) >= count:
                    break
                time.sleep(0.05)
        reset_runner()
    finally:
        listener.terminate()
        listener.wait(20)
        if listener.stderr:
            listener.stderr.close()
    got = {}
    for line in record.read_text().splitlines():
        _, name, at = line.split(" ")
        got[name] = float(at)
    record.unlink()
    assert len(got) == count, f"{len(got)} of {count} events reached the consumer"
    return [got[name] - sent[name] for name in sent], durations


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--catchup-events", type=int, default=100_000)
    parser.add_argument("--saves", type=int, default=1000)
    parser.add_argument("--pace", type=float, default=0.005, help="seconds between saves / raw messages")
    parser.add_argument("--quick", action="store_true", help="20,000 catch-up events, 300 saves")
    args = parser.parse_args()
    if args.quick:
        args.catchup_events, args.saves = 20_000, 300
    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    print(f"== catch-up: {args.catchup_events:,} logged events, durable no-op consumer (PostgreSQL)")
    fill_log(args.catchup_events)
    raw = raw_catchup(args.catchup_events)
    default = our_catchup(args.catchup_events)
    per_event = our_catchup(args.catchup_events, checkpoint_every=1)
    raw2 = raw_catchup(args.catchup_events)
    raw = max(raw, raw2)
    print(f"{'':44}{'events/s':>12}{'ratio':>8}")
    print(f"{'raw psycopg: read + json-decode, 5000/batch':44}{raw:>12,.0f}{1.0:>8.2f}")
    print(f"{'ours, default (cursor every 1,000 / 1 s)':44}{default:>12,.0f}{default / raw:>8.2f}")
    print(f"{'ours, checkpoint_every=1 (a save per event)':44}{per_event:>12,.0f}{per_event / raw:>8.2f}")
    print("target >= 20,000/s")

    print(f"\n== save -> consumer in another process, {args.saves} saves paced {args.pace * 1000:.0f} ms")
    print(f"{'':40}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    raw_pg = asyncio.run(raw_pg_latency(args.saves, args.pace))
    raw_redis = asyncio.run(raw_redis_latency(args.saves, args.pace))
    for name, values in [
        ("raw psycopg pg_notify -> LISTEN", raw_pg),
        ("raw redis PUBLISH -> SUBSCRIBE", raw_redis),
    ]:
        ms = [v * 1000 for v in values]
        print(f"{name:40}{percentile(ms, 0.5):>9.2f}{percentile(ms, 0.99):>9.2f}{max(ms):>9.2f}")
    for bus in ("postgres", "redis"):
        latencies, durations = our_e2e_latency(bus, args.saves, args.pace)
        ms = [v * 1000 for v in latencies]
        label = f"ours, {bus} bus: create() -> consumer"
        print(f"{label:40}{percentile(ms, 0.5):>9.2f}{percentile(ms, 0.99):>9.2f}{max(ms):>9.2f}")
        save_ms = [d * 1000 for d in durations]
        label = f"  (of which create() itself, {bus})"
        print(
            f"{label:40}{percentile(save_ms, 0.5):>9.2f}{percentile(save_ms, 0.99):>9.2f}{max(save_ms):>9.2f}"
        )
    print("target: p99 < 5 ms")


if __name__ == "__main__":
    main()
