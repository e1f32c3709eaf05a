"""Where the time of a tracked save goes, without the database: a profile by subtraction.

    python bench/bench_save_path.py

Each iteration builds a ``Product``, sends ``pre_save``/``post_save`` as a
create would, inside ``transaction.atomic()`` (no query runs, so no round
trip), with the Redis bus and ``STORE_EVENTS`` off. Steps are switched on one
by one; the differences are what each step costs per save. The last two rows
are the raw floor: the same save plus a bare socket write of the event's
PUBLISH on a plain socket (what no client can avoid).
"""

from __future__ import annotations

import os
import socket
import sys
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")


def main() -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.db import transaction
    from django.db.models.signals import post_save, pre_save
    from django.test.utils import override_settings

    from django_eventbus.capture import outbox, tracking
    from django_eventbus.delivery.runtime import get_runner, reset_runner
    from django_eventbus.events import Event
    from django_eventbus.events.codec import dumps_event
    from testproject.inventory.models import Product

    counter = [0]

    def save() -> None:
        counter[0] += 1
        with transaction.atomic():
            product = Product(name=f"p{counter[0]}", stock=1)
            product.pk = counter[0]
            pre_save.send(sender=Product, instance=product, raw=False, using="default", update_fields=None)
            product._state.adding, product._state.db = False, "default"
            post_save.send(
                sender=Product, instance=product, created=True, raw=False, using="default", update_fields=None
            )

    def measure() -> float:
        save()
        return min(timeit.repeat(save, number=5000, repeat=5)) / 5000 * 1e6

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    host, port = "127.0.0.1", 6379
    rows: list[tuple[str, float]] = []
    # tracking.emit is outbox.emit imported, not re-exported: mypy strict flags each patch of it.
    real_emit, real_publish = tracking.emit, outbox._publish_now  # type: ignore[attr-defined]
    base = {**settings.EVENTBUS, "BUS": url, "STORE_EVENTS": False}
    with override_settings(EVENTBUS={**base, "MODELS": {}}):
        rows.append(("untracked", measure()))
    with override_settings(EVENTBUS={**base, "MODELS": {"inventory.Product": {}}}):
        get_runner().bus  # noqa: B018 - connect first
        try:
            tracking.emit = lambda events, using=None: None  # type: ignore[attr-defined]
            rows.append(("+ signals, payload, Event", measure()))
            tracking.emit = real_emit  # type: ignore[attr-defined]
            outbox._publish_now = lambda events, wait=False: None
            rows.append(("+ buffer, on_commit", measure()))
            sock = socket.create_connection((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def raw_write(events: list[Event], wait: bool = False) -> Any:
                payload = dumps_event(events[0]).encode()
                channel = b"bench:inventory:product"
                return sock.sendall(
                    b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
                    % (len(channel), channel, len(payload), payload)
                )

            outbox._publish_now = raw_write
            rows.append(("+ JSON + bare socket write (floor)", measure()))
            outbox._publish_now = real_publish
            rows.append(("+ our publish (django-eventbus)", measure()))
            sock.close()
        finally:
            tracking.emit, outbox._publish_now = real_emit, real_publish  # type: ignore[attr-defined]
    reset_runner()
    print("One tracked create's Python path, no database, Redis bus, STORE_EVENTS off")
    print(f"{'':40}{'us/save':>9}{'step':>8}")
    previous = None
    for name, value in rows:
        step = "" if previous is None else f"{value - previous:+.1f}"
        print(f"{name:40}{value:>9.1f}{step:>8}")
        if not name.startswith("+ JSON"):
            previous = value
    ours, floor = rows[-1][1], rows[-2][1]
    print(f"our publish vs the bare write: {ours - floor:+.1f} us per save")


if __name__ == "__main__":
    main()
