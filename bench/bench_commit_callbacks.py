"""One transaction of N tracked saves: one ``on_commit`` callback per savepoint level vs one per save.

    python bench/bench_commit_callbacks.py [--sizes 1,100,10000] [--repeats R] [--bus redis|postgres-django]

``capture/outbox.py`` reuses one ``on_commit(robust=True)`` callback per savepoint
level through :func:`~django_eventbus.db_commit.on_commit_state`, which reads
Django's ``savepoint_ids`` and ``run_on_commit``. Without that adapter (its
public fallback, forced here by making it return ``None``) every ``emit()`` — every
tracked save — registers its own callback, which Django drains with ``list.pop(0)``
and which publishes its one event on its own.

For each size N, interleaved, ``--repeats`` times: ``transaction.atomic()`` around N
``Product.objects.create()`` with signal capture, until every event reached the bus
(``flush_pending``), for

- ``untracked``: ``Product`` not tracked (plain Django: the baseline);
- ``adapter``: tracked, one callback per savepoint level (the code as shipped);
- ``per save``: tracked, one callback per ``emit()``.

Prints the median milliseconds per transaction ("total") and of its commit and
publish alone ("commit": leaving ``atomic()`` until ``flush_pending`` returns, where
the two versions differ), each with its ratio to the untracked baseline. The
database is ``eventbus_bench_commit`` on the local server (created if missing;
override with BENCH_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from decimal import Decimal
from typing import Any

# Its own database: other benchmarks may run at the same time, and this one truncates tables.
os.environ.setdefault("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/eventbus_bench_commit")

from bench_model_events import ensure_database  # noqa: E402  (also points Django at that database)

MODES = ("untracked", "adapter", "per save")
BUSES: dict[str, Any] = {
    "postgres-django": {"backend": "postgres", "channel_prefix": "bench"},
    "redis": "redis://127.0.0.1:6379/0",
    "memory": "memory://",
}


def one_transaction(mode: str, bus: Any, size: int) -> tuple[float, float]:
    """Seconds for one ``atomic()`` of ``size`` creates, and of its commit and publish alone."""
    from django.db import connection, transaction
    from django.test.utils import override_settings

    from django_eventbus.capture import outbox
    from testproject.inventory.models import Product

    models: dict[str, dict[str, object]] = {} if mode == "untracked" else {"inventory.Product": {}}
    adapter = outbox.on_commit_state
    with override_settings(EVENTBUS={"BUS": bus, "MODELS": models, "CAPTURE": "signals"}):
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE inventory_product, django_eventbus_event RESTART IDENTITY CASCADE")
        if mode == "per save":
            outbox.on_commit_state = lambda connection: None  # its public fallback
        try:
            start = time.perf_counter()
            with transaction.atomic():
                for i in range(size):
                    Product.objects.create(name=f"p{i}", price=Decimal("1.00"), stock=i)
                saved = time.perf_counter()
            if mode != "untracked":
                outbox.flush_pending()
            end = time.perf_counter()
            return end - start, end - saved
        finally:
            outbox.on_commit_state = adapter


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,100,10000", help="saves per transaction, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bus", default="redis", choices=sorted(BUSES))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ensure_database(os.environ["DATABASE_URL"])
    import django

    django.setup()
    from django.core.management import call_command

    from django_eventbus.delivery.runtime import reset_runner

    call_command("migrate", verbosity=0)
    bus = BUSES[args.bus]
    print(f"bus {args.bus}, one transaction of N tracked creates, median of {args.repeats}")
    print(f"{'N':>7} {'':<7}" + "".join(f"{mode + ' ms':>22}" for mode in MODES))
    for size in sizes:
        runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        repeats = args.repeats if size < 10_000 else max(1, args.repeats // 2)
        for _ in range(repeats + 1):  # the first round warms up the connections
            for mode in MODES:
                runs[mode].append(one_transaction(mode, bus, size))
        for label, index in (("total", 0), ("commit", 1)):
            medians = {mode: statistics.median(r[index] for r in runs[mode][1:]) * 1000 for mode in MODES}
            base = medians["untracked"]
            cells = "".join(f"{medians[m]:>13,.2f} ({medians[m] / base:.2f}x)" for m in MODES)
            print(f"{size:>7,} {label:<7}{cells}")
        reset_runner()


if __name__ == "__main__":
    main()
