"""Cost of each capture mode: inserts and updates per second on PostgreSQL.

    python bench/bench_capture.py [--rows N] [--bulk N] [--repeats R] [--bus postgres-django|redis|memory]
    python bench/bench_capture.py --writers 1,8,32 [--seconds S]

In one run, interleaved, for ``Product`` untracked (plain Django, the baseline),
tracked by the default signal capture (log row + publish at commit on ``--bus``)
and tracked by database capture (``EVENTBUS["CAPTURE"] = "database"``: the
statement trigger writes the log row; the listener's relay publishes it later,
so the writer does no publish):

- ``create()``, each in its own ``transaction.atomic()`` (synchronous commit);
- ``save()`` of a loaded row changing one field, each in its own ``atomic()``;
- one ``bulk_update`` of ``--bulk`` rows (default 10,000) in one transaction.

Each figure is the median of ``--repeats`` runs, with its ratio to the untracked
baseline. ``--writers`` instead runs N processes, each committing tracked
``create()``s in a loop for ``--seconds``, with database capture alone and with a
``pg_notify`` in every writing transaction (the in-transaction wake-up the issue
warns about), and prints commits per second.

The database is ``eventbus_bench`` on the local server (created if missing;
override with BENCH_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

# Its own database: other benchmarks may run at the same time, and this one truncates tables.
os.environ.setdefault("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/eventbus_bench_capture")

from bench_model_events import ensure_database  # noqa: E402  (also points Django at that database)

MODES = ("untracked", "signals", "database")


def setup_django() -> None:
    ensure_database(os.environ["DATABASE_URL"])
    import django

    django.setup()


def eventbus_setting(mode: str, bus: Any) -> dict[str, Any]:
    models: dict[str, Any] = {} if mode == "untracked" else {"inventory.Product": {}}
    capture = "database" if mode == "database" else "signals"
    return {"BUS": bus, "MODELS": models, "CAPTURE": capture}


def timed(work: Callable[[], int]) -> float:
    """Operations per second of ``work`` (which returns how many it did)."""
    start = time.perf_counter()
    count = work()
    return count / (time.perf_counter() - start)


def measure(mode: str, bus: Any, rows: int, bulk: int) -> dict[str, float]:
    from django.db import OperationalError, connection, transaction
    from django.test.utils import override_settings

    from django_eventbus.capture import triggers as capture_database
    from django_eventbus.capture.outbox import flush_pending
    from testproject.inventory.models import Product

    with override_settings(EVENTBUS=eventbus_setting(mode, bus)):
        capture_database.install()  # creates database capture's triggers, or removes them
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE inventory_product, django_eventbus_event RESTART IDENTITY CASCADE")

        def creates() -> int:
            for i in range(rows):
                with transaction.atomic():
                    Product.objects.create(name=f"p{i}", price=Decimal("1.00"), stock=i)
            return rows

        def saves() -> int:
            for i, product in enumerate(list(Product.objects.all()[:rows])):
                product.stock = i + 1
                with transaction.atomic():
                    product.save()
            return rows

        result = {"create() per s": timed(creates), "save() per s": timed(saves)}
        for first in range(0, bulk, 1000):  # one transaction each: under the 1,664-NOTIFY limit
            Product.objects.bulk_create([Product(name=f"b{i}", stock=i) for i in range(first, first + 1000)])
        objs = list(Product.objects.filter(name__startswith="b"))
        for obj in objs:
            obj.stock += 1

        def bulk_update() -> int:
            with transaction.atomic():
                Product.objects.bulk_update(objs, ["stock"], batch_size=2000)
            return len(objs)

        try:
            result["bulk_update rows per s"] = timed(bulk_update)
        except OperationalError as exc:  # the in-transaction NOTIFY path of issue 14 (>1,664 events)
            print(f"{mode}: bulk_update failed: {exc}")
            result["bulk_update rows per s"] = float("nan")
        flush_pending()
        capture_database.uninstall()
    return result


def single_process(args: argparse.Namespace) -> None:
    setup_django()
    from django.core.management import call_command

    from django_eventbus.delivery.runtime import reset_runner

    call_command("migrate", verbosity=0)
    bus: Any = {
        "postgres-django": {"backend": "postgres", "channel_prefix": "bench"},
        "redis": "redis://127.0.0.1:6379/0",
        "memory": "memory://",
    }[args.bus]
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            runs[mode].append(measure(mode, bus, args.rows, args.bulk))
            reset_runner()
    print(
        f"bus {args.bus}, {args.rows} single-row writes, bulk_update of {args.bulk}, {args.repeats} repeats"
    )
    print(f"{'measure':<24}" + "".join(f"{mode:>22}" for mode in MODES))
    for key in runs["untracked"][0]:
        medians = {mode: statistics.median(r[key] for r in runs[mode]) for mode in MODES}
        base = medians["untracked"]
        cells = "".join(f"{medians[m]:>13,.0f} ({medians[m] / base:.2f}x)" for m in MODES)
        print(f"{key:<24}{cells}")


def writer(seconds: float, notify: bool, start: Any, counts: Any) -> None:
    setup_django()
    from django.db import connection, transaction
    from django.test.utils import override_settings

    from testproject.inventory.models import Product

    connection.ensure_connection()
    start.wait()
    done = 0
    with override_settings(EVENTBUS=eventbus_setting("database", "memory://")):  # no signal path
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            with transaction.atomic():
                Product.objects.create(name="w")
                if notify:
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_notify('eventbus_bench_wake', '')")
            done += 1
    connection.close()
    counts.put(done)


def many_writers(args: argparse.Namespace) -> None:
    setup_django()
    from django.core.management import call_command
    from django.db import connections
    from django.test.utils import override_settings

    from django_eventbus.capture import triggers as capture_database

    call_command("migrate", verbosity=0)
    # Child processes read the same settings module: database capture is switched on in the
    # database (the triggers), the children need no EVENTBUS change since they only write.
    with override_settings(EVENTBUS=eventbus_setting("database", "memory://")):
        capture_database.install()
    # Spawned, not forked: a forked child would share the parent's database socket.
    spawn = multiprocessing.get_context("spawn")
    connections.close_all()
    print(f"commits per second, tracked create() with database capture, {args.seconds:.0f} s per run")
    print(f"{'writers':>8}{'no NOTIFY':>14}{'NOTIFY in tx':>16}{'ratio':>8}")
    try:
        for n in [int(w) for w in args.writers.split(",")]:
            rates = []
            for notify in (False, True):
                start = spawn.Barrier(n + 1)  # every child connected, then all start at once
                counts: Any = spawn.Queue()
                procs = [
                    spawn.Process(target=writer, args=(args.seconds, notify, start, counts)) for _ in range(n)
                ]
                for proc in procs:
                    proc.start()
                start.wait()
                total = sum(counts.get(timeout=args.seconds + 60) for _ in procs)
                for proc in procs:
                    proc.join()
                rates.append(total / args.seconds)
            print(f"{n:>8}{rates[0]:>14,.0f}{rates[1]:>16,.0f}{rates[1] / rates[0]:>8.2f}")
    finally:
        with override_settings(EVENTBUS=eventbus_setting("database", "memory://")):
            capture_database.uninstall()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--bulk", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bus", default="postgres-django", choices=["postgres-django", "redis", "memory"])
    parser.add_argument("--quick", action="store_true", help="300 rows, bulk of 2,000, 1 repeat")
    parser.add_argument("--writers", help="comma-separated process counts, e.g. 1,8,32")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.bulk, args.repeats = 300, 2000, 1
    if args.writers:
        many_writers(args)
    else:
        single_process(args)


if __name__ == "__main__":
    main()
