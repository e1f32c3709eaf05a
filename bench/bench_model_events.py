"""Cost of tracking a model: ``Product.objects.create()`` rate on PostgreSQL.

    python bench/bench_model_events.py [--creates N] [--repeats R] [--bus postgres-django|redis|memory]

Each create runs in its own ``transaction.atomic()``. In one run, alternating,
it measures the model untracked (the baseline: plain Django), tracked with
``STORE_EVENTS`` on (log row + publish) and tracked with it off (publish only),
and prints each rate and its ratio to the baseline. Issue targets: tracked
>= 0.6x untracked with STORE_EVENTS on, >= 0.85x with it off.

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

    from django_eventbus.runtime import get_runner, reset_runner
    from testproject.inventory.models import Product

    call_command("migrate", verbosity=0)
    bus: Any = {
        "postgres-django": {"backend": "postgres", "channel_prefix": "bench"},
        "redis": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "memory": "memory://",
    }[args.bus]

    def run(models: dict[str, Any], store: bool) -> float:
        config = {**settings.EVENTBUS, "BUS": bus, "MODELS": models, "STORE_EVENTS": store}
        with override_settings(EVENTBUS=config):
            get_runner().bus  # noqa: B018 - connect outside the timed loop
            Product.objects.create(name="warm-up")
            start = time.perf_counter()
            for i in range(args.creates):
                with transaction.atomic():
                    Product.objects.create(name=f"p{i}", stock=i)
            elapsed = time.perf_counter() - start
            get_runner().flush()
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE inventory_product, django_eventbus_event RESTART IDENTITY CASCADE")
        return args.creates / elapsed

    tracked = {"inventory.Product": {}}
    names = ["untracked", "tracked, STORE_EVENTS on", "tracked, STORE_EVENTS off"]
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        results["untracked"].append(run({}, True))
        results["tracked, STORE_EVENTS on"].append(run(tracked, True))
        results["tracked, STORE_EVENTS off"].append(run(tracked, False))
    reset_runner()

    base = statistics.median(results["untracked"])
    print(f"Product.objects.create() in its own atomic(), PostgreSQL, bus={args.bus}")
    print(f"{args.creates:,} creates x {args.repeats} runs, medians")
    print(f"{'':30}{'creates/s':>12}{'ratio':>8}{'target':>9}")
    targets = {"untracked": "", "tracked, STORE_EVENTS on": ">= 0.60", "tracked, STORE_EVENTS off": ">= 0.85"}
    for name, runs in results.items():
        rate = statistics.median(runs)
        print(f"{name:30}{rate:>12,.0f}{rate / base:>8.2f}{targets[name]:>9}")


if __name__ == "__main__":
    main()
