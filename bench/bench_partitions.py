"""Scaling a partitioned consumer out: events/s with 1, 2 and 4 listener processes.

    python bench/bench_partitions.py [--events N] [--delay SECONDS] [--bus postgres|redis]

The consumer is testproject's recorder with ``partitions=4`` and a handler that waits
``--delay`` (5 ms: an I/O-bound handler, e.g. an HTTP call) per event; each process runs
only it (``eventbus_listen --consumer inventory.recorder``). For each count of listener
processes, once they have shared the partitions (ceil(4 / processes) each), N events of
N rows are logged in one transaction (a backlog: what a consumer scaled out to catch up
faces) and the clock runs from that commit to the last event handled. ``--live`` instead
creates N products in transactions of 100 through the ORM while the listeners run (the
writer then shares the 2 cores with them). The baseline is one process running the same
consumer in the same run; the handler-bound ceiling (processes / delay) is printed beside
it. Targets: 2 processes >= 1.8x, 4 processes >= 3.4x.

Database: ``eventbus_bench`` on the local server (created if missing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench_listener import DB_URL, REDIS_URL, ROOT, ensure_database


def start(env: dict[str, str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "manage.py", "eventbus_listen", "--consumer", "inventory.recorder"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if "listening on" in line:
            break
    else:
        raise RuntimeError(f"listener exited: {process.wait()}")
    # Keep draining its log, or a full pipe would stop it.
    threading.Thread(target=process.stderr.read, daemon=True).start()
    return process


def shares() -> list[int]:
    from django_eventbus.models import ConsumerCursor

    owners = ConsumerCursor.objects.filter(name__startswith="inventory.recorder#").values_list(
        "owner", flat=True
    )
    return sorted(Counter(owner for owner in owners if owner).values())


def log_backlog(events: int) -> None:
    """``events`` product events of distinct rows, logged in one transaction (no ORM, no publish)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO django_eventbus_event (event_id, type, topic, payload, timestamp, source, metadata)
               SELECT gen_random_uuid()::text, 'created', 'inventory:product',
                      jsonb_build_object('model', 'inventory.product', 'pk', g,
                                         'fields', jsonb_build_object('name', 'e' || g, 'stock', 1)),
                      now(), 'bench', '{}'::jsonb
               FROM generate_series(1, %s) g""",
            [events],
        )


def run(processes: int, events: int, delay: float, bus: str, live: bool) -> float:
    """Events/s of the partitioned consumer run by ``processes`` listener processes."""
    from django.conf import settings
    from django.db import connection, transaction
    from django.test.utils import override_settings

    from django_eventbus.delivery.runtime import get_runner, reset_runner
    from django_eventbus.events.bus import parse_bus_url
    from testproject.inventory.models import Product

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE django_eventbus_event, django_eventbus_cursor, django_eventbus_member, "
            "inventory_product CASCADE"
        )
    prefix = f"bp{os.getpid()}x{processes}"
    url = "postgres://" if bus == "postgres" else REDIS_URL
    folder = Path(tempfile.mkdtemp(prefix="bench-partitions-"))
    env = {
        **os.environ,
        "EVENTBUS_URL": url,
        "EVENTBUS_CHANNEL_PREFIX": prefix,
        "EVENTBUS_RECORD_DELAY": str(delay),
        "EVENTBUS_RECORD_PARTITIONS": "4",
        "EVENTBUS_CATCHUP_INTERVAL": "0.2",
        "EVENTBUS_LOG": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    listeners = [start({**env, "EVENTBUS_RECORD_TO": str(folder / f"{i}.txt")}) for i in range(processes)]
    files = [folder / f"{i}.txt" for i in range(processes)]
    try:
        wanted = sorted(Counter(i % processes for i in range(4)).values())
        deadline = time.monotonic() + 60
        while shares() != wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the listeners did not share the partitions: {shares()}")
            time.sleep(0.05)
        if live:
            config = {**settings.EVENTBUS, "BUS": {**parse_bus_url(url), "channel_prefix": prefix}}
            with override_settings(EVENTBUS=config):
                get_runner().bus  # noqa: B018 - connect before timing
                start_time = time.time()
                for first in range(0, events, 100):
                    with transaction.atomic():
                        for i in range(first, min(events, first + 100)):
                            Product.objects.create(name=f"e{i}", stock=1)
                get_runner().flush()
                reset_runner()
        else:
            start_time = time.time()
            log_backlog(events)

        def handled() -> list[float]:
            times: list[float] = []
            for path in files:
                if path.exists():
                    times += [
                        float(line.split(" ")[2]) for line in path.read_text().splitlines() if " e" in line
                    ]
            return times

        deadline = time.monotonic() + 600
        while len(times := handled()) < events:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(times)} of {events} handled")
            time.sleep(0.1)
        if len(times) != events:
            raise RuntimeError(f"{len(times)} handled for {events} events: some twice")
        return events / (max(times) - start_time)
    finally:
        for process in listeners:
            process.terminate()
        for process in listeners:
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--delay", type=float, default=0.005, help="seconds the handler waits per event")
    parser.add_argument("--bus", choices=["postgres", "redis"], default="postgres")
    parser.add_argument("--live", action="store_true", help="ORM creates while the listeners run")
    args = parser.parse_args()
    os.environ["DATABASE_URL"] = DB_URL
    os.environ["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    source = "ORM creates while they run" if args.live else "a backlog logged in one transaction"
    print(
        f"== {args.events:,} events ({source}), a consumer with 4 partitions whose handler "
        f"waits {args.delay * 1000:.0f} ms per event ({args.bus} bus)"
    )
    print(f"{'listener processes':24}{'events/s':>10}{'vs 1':>8}{'ceiling':>10}{'target':>8}")
    baseline = 0.0
    for processes, target in ((1, None), (2, 1.8), (4, 3.4)):
        rate = run(processes, args.events, args.delay, args.bus, args.live)
        baseline = baseline or rate
        ceiling = f"{processes / args.delay:,.0f}" if args.delay else "-"
        goal = f">={target}x" if target else ""
        print(f"{processes:<24}{rate:>10,.0f}{rate / baseline:>7.2f}x{ceiling:>10}{goal:>8}")


if __name__ == "__main__":
    main()
