"""The event log admin on a big log: changelist and detail times with 1,000,000 events in PostgreSQL.

    python bench/bench_admin.py [--rows N] [--repeats R] [--refill] [--pattern-index] [--explain]

Fills ``eventbus_bench_admin`` (created if missing; BENCH_ADMIN_DATABASE_URL
overrides it) with N events in one ``INSERT … SELECT generate_series`` (skewed
topics and a tail of 50 rarer ones, 9 sources, correlation ids shared by 3 events, ~7
days of timestamps), then ``VACUUM ANALYZE`` as autovacuum would. The rows are
kept between runs; ``--refill`` rebuilds them.

Each page is fetched with Django's test client as a logged-in superuser
(``DEBUG=False``, the full admin stack: middleware, session, templates):
warm-up, then R timed requests; the median and the slowest are printed. The
"SQL" column is the baseline: the same event-log queries the page ran,
executed raw on a cursor (median over R), so the difference is Django's own
rendering. ``SELECT COUNT(*)`` of the table is printed for comparison: it is
what the admin would run on every page view without EventLogPaginator.

``--pattern-index`` measures the searches and topic filters again with the
index ``eventbus_topic_id`` rebuilt as ``(topic varchar_pattern_ops, id)`` (in
a transaction that is rolled back), the change requested for the model.
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
DATABASE_URL = os.environ.get(
    "BENCH_ADMIN_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/eventbus_bench_admin"
)
os.environ["DATABASE_URL"] = DATABASE_URL
os.environ["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
os.environ.setdefault("EVENTBUS_URL", "memory://")

# One statement builds every row server-side: no round trip per row. The distribution
# mimics a real log: a few hot topics, a tail of 50 tenant topics (0.2% each), 9 sources.
FILL_SQL = """
INSERT INTO django_eventbus_event
    (event_id, type, topic, payload, timestamp, source, correlation_id, metadata)
SELECT
    md5('event-' || i)::uuid::text,
    CASE WHEN mod(i, 100) < 40 THEN 'created' WHEN mod(i, 100) < 85 THEN 'updated'
         WHEN mod(i, 100) < 95 THEN 'deleted' WHEN mod(i, 100) < 99 THEN 'custom' ELSE 'error' END,
    CASE WHEN mod(i, 20) < 10 THEN 'inventory:product' WHEN mod(i, 20) < 15 THEN 'inventory:order'
         WHEN mod(i, 20) < 18 THEN 'billing:invoice' ELSE 'tenant-' || mod(i, 500) || ':event' END,
    jsonb_build_object('model', 'inventory.product', 'pk', i, 'fields',
        jsonb_build_object('name', 'product ' || i, 'price', mod(i, 1000) / 10.0, 'stock', mod(i, 50))),
    now() - ((%(rows)s - i) * interval '600 milliseconds'),
    CASE WHEN mod(i, 50) = 0 THEN 'worker-1:2000' ELSE 'web-' || mod(i, 8) || ':' || (1000 + mod(i, 8)) END,
    md5('request-' || (i / 3)),
    '{}'::jsonb
FROM generate_series(1, %(rows)s) AS i
"""


def ensure_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def timed(func: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--refill", action="store_true", help="rebuild the rows even if they are there")
    parser.add_argument("--pattern-index", action="store_true", help="also measure with the requested index")
    parser.add_argument("--explain", action="store_true", help="print the plan of each page's main query")
    args = parser.parse_args()
    ensure_database(DATABASE_URL)

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, override_settings
    from django.urls import reverse

    from django_eventbus.models import StoredEvent

    call_command("migrate", verbosity=0)
    cursor = connection.cursor()
    cursor.execute("SELECT count(*) FROM django_eventbus_event")
    present = cursor.fetchone()[0]
    if args.refill or present != args.rows:
        print(f"filling {args.rows:,} events …", flush=True)
        start = time.perf_counter()
        cursor.execute("TRUNCATE django_eventbus_event RESTART IDENTITY")
        cursor.execute(FILL_SQL, {"rows": args.rows})
        filled = time.perf_counter() - start
        cursor.execute("VACUUM ANALYZE django_eventbus_event")
        print(
            f"filled in {filled:.1f} s, VACUUM ANALYZE {time.perf_counter() - start - filled:.1f} s",
            flush=True,
        )
    else:
        print(f"reusing the {present:,} events in the database (--refill to rebuild)")
    cursor.execute("SELECT pg_size_pretty(pg_total_relation_size('django_eventbus_event'))")
    size = cursor.fetchone()[0]
    cursor.execute("SELECT version()")
    print(f"{cursor.fetchone()[0].split(' on ')[0]}; table with indexes: {size}")

    user = User.objects.filter(username="bench").first() or User.objects.create_superuser(
        "bench", "b@x.y", "pw"
    )
    client = Client()
    client.force_login(user)

    middle = StoredEvent.objects.order_by("id").values_list("pk", "event_id", "correlation_id")[
        args.rows // 2
    ]
    old = StoredEvent.objects.order_by("id").values_list("event_id", flat=True)[10]
    changelist = reverse("admin:django_eventbus_storedevent_changelist")
    detail = reverse("admin:django_eventbus_storedevent_change", args=[middle[0]])
    by_event_id = reverse("admin:django_eventbus_storedevent_change", args=[middle[1]])
    pages: list[tuple[str, str]] = [
        ("first page", changelist),
        ("page 50", changelist + "?p=50"),
        ("type filter (deleted, 10%)", changelist + "?type__exact=deleted"),
        ("type filter (error, 1%)", changelist + "?type__exact=error"),
        ("topic filter (hot)", changelist + "?topic=inventory:order"),
        ("topic filter (tail, 0.2%)", changelist + "?topic=tenant-18:event"),
        ("source filter (2%)", changelist + "?source=worker-1:2000"),
        ("date filter (today)", ""),  # the filter's own link, found below
        ("search: event id (middle)", changelist + f"?q={middle[1]}"),
        ("search: event id (oldest)", changelist + f"?q={old}"),
        ("search: correlation id", changelist + f"?q={middle[2]}"),
        ("search: topic prefix", changelist + "?q=billing:"),
        ("search: no match (worst case)", changelist + "?q=no-such-topic:"),
        ("detail page", detail),
        ("detail by event id", by_event_id),
    ]

    import re

    with override_settings(DEBUG=False):
        html = client.get(changelist).content.decode()
        today = re.search(r'<a href="\?([^"]+)">Today</a>', html)
        assert today, "no Today link in the date filter"
        pages = [(n, u if u else changelist + "?" + today.group(1).replace("&amp;", "&")) for n, u in pages]

        def measure(pages: list[tuple[str, str]]) -> None:
            print(f"\n{'page':<30} {'median':>9} {'slowest':>9} {'SQL':>9} {'queries':>8}")
            for name, url in pages:
                for _ in range(2):  # warm-up: caches, plans, connection
                    assert client.get(url).status_code == 200, url
                with CaptureQueriesContext(connection) as queries:
                    response = client.get(url)
                assert response.status_code == 200
                # Read them now: the next requests clear the connection's query log.
                query_count = len(queries.captured_queries)
                event_sql = [
                    q["sql"] for q in queries.captured_queries if "django_eventbus_event" in q["sql"]
                ]
                times = timed(lambda url=url: client.get(url), args.repeats)

                def raw(event_sql: list[str] = event_sql) -> None:
                    with connection.cursor() as c:
                        for sql in event_sql:
                            c.execute(sql)
                            c.fetchall()

                raw_times = timed(raw, args.repeats)
                print(
                    f"{name:<30} {statistics.median(times):>7.1f}ms {max(times):>7.1f}ms "
                    f"{statistics.median(raw_times):>7.1f}ms {query_count:>8}",
                    flush=True,
                )
                if args.explain:
                    for sql in event_sql:
                        with connection.cursor() as c:
                            c.execute("EXPLAIN (ANALYZE, BUFFERS OFF) " + sql)
                            print("    " + sql[:200])
                            for (line,) in c.fetchall():
                                print("      " + line)

        measure(pages)

        count_times = timed(
            lambda: cursor.execute("SELECT COUNT(*) FROM django_eventbus_event"), args.repeats
        )
        cursor.fetchall()
        count_ms = statistics.median(count_times)
        print(f"\nfor comparison, SELECT COUNT(*) of the table: {count_ms:.1f} ms (median)")

        if args.pattern_index:
            # The index *replacing* (topic, id), in a transaction rolled back afterwards: it must
            # serve the equality filter as well as the prefix search, with no extra index to write.
            print("\nwith eventbus_topic_id rebuilt as (topic varchar_pattern_ops, id):")
            with transaction.atomic():
                cursor.execute("DROP INDEX eventbus_topic_id")
                cursor.execute(
                    "CREATE INDEX eventbus_topic_id ON django_eventbus_event (topic varchar_pattern_ops, id)"
                )
                cursor.execute("ANALYZE django_eventbus_event")
                measure([p for p in pages if p[0].startswith(("search", "topic"))])
                transaction.set_rollback(True)


if __name__ == "__main__":
    main()
