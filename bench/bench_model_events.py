"""Cost of tracking a model: ``Product.objects.create()`` rate on PostgreSQL.

    python bench/bench_model_events.py [--creates N] [--repeats R] [--bus postgres-django|redis|memory]

Each create runs in its own ``transaction.atomic()``. In one run, alternating,
it measures the model untracked (the baseline: plain Django), tracked with
``STORE_EVENTS`` on (log row + publish) and tracked with it off (publish only),
and prints each rate and its ratio to the baseline. Issue targets: tracked
>= 0.6x untracked with STORE_EVENTS on, >= 0.85x with it off.

Beside them, the same untracked create plus what a hand-written integration with
the raw client would do, so the cost of the transport itself on this machine is
visible (the "vs raw" column is ours / that):

- postgres-django: the raw ``INSERT … ; pg_notify`` of the log row as one
  statement in the transaction (the issue's CTE), and a bare ``pg_notify``;
- redis: a redis-py ``PUBLISH`` of the same JSON after the commit.

The database is ``eventbus_bench`` on the local server (created if missing;
override with BENCH_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/eventbus_bench"
os.environ["DATABASE_URL"] = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
os.environ["DJANGO_SETTINGS_MODULE"] = "testproject.settings"


def ensure_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--creates", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bus", default="postgres-django", choices=["postgres-django", "redis", "memory"])
    parser.add_argument("--quick", action="store_true", help="500 creates, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.creates, args.repeats = 500, 3
    ensure_database(os.environ["DATABASE_URL"])

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.test.utils import override_settings

    from django_eventbus.delivery.runtime import get_runner, reset_runner
    from testproject.inventory.models import Product

    call_command("migrate", verbosity=0)
    bus: Any = {
        "postgres-django": {"backend": "postgres", "channel_prefix": "bench"},
        "redis": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "memory": "memory://",
    }[args.bus]

    from django_eventbus.events import Event, EventType
    from django_eventbus.events.codec import dumps, dumps_event

    # What a hand-written integration sends: an event of the same shape and size.
    sample = Event(
        type=EventType.CREATED,
        topic="inventory:product",
        payload={"model": "inventory.product", "pk": 1, "fields": {"name": "p1", "stock": 1}},
    )
    raw_json = dumps_event(sample)
    log_insert = (
        "INSERT INTO django_eventbus_event"
        " (event_id, type, topic, payload, timestamp, source, correlation_id, metadata)"
        " VALUES (gen_random_uuid()::text, 'created', 'inventory:product', %s::jsonb, now(), 'bench', NULL,"
        " '{}'::jsonb)"
    )

    def after_nothing() -> None:
        pass

    def raw_log_and_notify() -> None:  # inside the transaction, one statement (the CTE)
        with connection.cursor() as cursor:
            sql = f"WITH ins AS ({log_insert} RETURNING 1) SELECT pg_notify('bench', %s) FROM ins"
            cursor.execute(sql, [dumps(sample.payload), raw_json])

    def raw_log() -> None:  # inside the transaction
        with connection.cursor() as cursor:
            cursor.execute(log_insert, [dumps(sample.payload)])

    def raw_notify() -> None:  # inside the transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify('bench', %s)", [raw_json])

    redis_client: Any = None

    def raw_publish() -> None:  # after the commit
        redis_client.publish("bench:inventory:product", raw_json)

    def run(
        models: dict[str, Any], store: bool, in_tx: Any = after_nothing, after: Any = after_nothing
    ) -> float:
        config = {**settings.EVENTBUS, "BUS": bus, "MODELS": models, "STORE_EVENTS": store}
        with override_settings(EVENTBUS=config):
            get_runner().bus  # noqa: B018 - connect outside the timed loop
            Product.objects.create(name="warm-up")
            start = time.perf_counter()
            for i in range(args.creates):
                with transaction.atomic():
                    Product.objects.create(name=f"p{i}", stock=i)
                    in_tx()
                after()
            elapsed = time.perf_counter() - start
            get_runner().flush()
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE inventory_product, django_eventbus_event RESTART IDENTITY CASCADE")
        return float(args.creates) / elapsed

    tracked: dict[str, Any] = {"inventory.Product": {}}
    variants: dict[str, Any] = {
        "untracked": lambda: run({}, True),
        "tracked, STORE_EVENTS on": lambda: run(tracked, True),
        "tracked, STORE_EVENTS off": lambda: run(tracked, False),
    }
    raw_for: dict[str, str] = {}
    if args.bus == "postgres-django":
        variants["raw: + INSERT log; pg_notify"] = lambda: run({}, True, in_tx=raw_log_and_notify)
        variants["raw: + pg_notify"] = lambda: run({}, True, in_tx=raw_notify)
        raw_for = {
            "tracked, STORE_EVENTS on": "raw: + INSERT log; pg_notify",
            "tracked, STORE_EVENTS off": "raw: + pg_notify",
        }
    elif args.bus == "redis":
        import redis

        redis_client = redis.Redis.from_url(bus)
        variants["raw: + INSERT log; PUBLISH"] = lambda: run({}, True, in_tx=raw_log, after=raw_publish)
        variants["raw: + PUBLISH after commit"] = lambda: run({}, True, after=raw_publish)
        raw_for = {
            "tracked, STORE_EVENTS on": "raw: + INSERT log; PUBLISH",
            "tracked, STORE_EVENTS off": "raw: + PUBLISH after commit",
        }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, measure in variants.items():
            results[name].append(measure())
    reset_runner()

    rates = {name: statistics.median(runs) for name, runs in results.items()}
    base = rates["untracked"]
    print(f"Product.objects.create() in its own atomic(), PostgreSQL, bus={args.bus}")
    print(f"{args.creates:,} creates x {args.repeats} runs (interleaved), medians")
    print(f"{'':32}{'creates/s':>11}{'ratio':>8}{'target':>9}{'vs raw':>8}")
    targets = {"tracked, STORE_EVENTS on": ">= 0.60", "tracked, STORE_EVENTS off": ">= 0.85"}
    for name, rate in rates.items():
        versus = f"{rate / rates[raw_for[name]]:.2f}" if name in raw_for else ""
        print(f"{name:32}{rate:>11,.0f}{rate / base:>8.2f}{targets.get(name, ''):>9}{versus:>8}")


if __name__ == "__main__":
    main()
