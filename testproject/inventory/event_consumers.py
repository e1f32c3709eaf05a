"""The demo's consumers (autodiscovered: every app's ``event_consumers`` module is imported).

``manage.py eventbus_listen`` runs them; with the memory bus they run in the web process.
"""

from __future__ import annotations

import logging
import os
import time

from django_eventbus import consumer
from django_eventbus.events import Event

logger = logging.getLogger("testproject.inventory")


@consumer("inventory:product", name="inventory.low_stock")
def warn_on_low_stock(event: Event) -> None:
    """Log products that ran low (a sync consumer may use the ORM)."""
    stock = event.payload.get("fields", {}).get("stock")
    if isinstance(stock, int) and stock < 3 and event.type.value != "deleted":
        logger.warning("product %s is low on stock (%d)", event.payload.get("pk"), stock)


if os.environ.get("EVENTBUS_RECORD_TO"):
    # For the fault tests and the latency benchmark: append "event_id name unix_time" per event.
    _path = os.environ["EVENTBUS_RECORD_TO"]
    # A slower handler, so a test can kill a process while events are in flight.
    _delay = float(os.environ.get("EVENTBUS_RECORD_DELAY", "0"))
    # Partitions, for the scale-out tests and benchmark (one partition: unpartitioned).
    _partitions = int(os.environ.get("EVENTBUS_RECORD_PARTITIONS", "1"))

    @consumer("inventory:*", name="inventory.recorder", partitions=_partitions)
    def record(event: Event) -> None:
        if _delay:
            time.sleep(_delay)
        with open(_path, "a", encoding="utf-8") as file:
            name = event.payload.get("fields", {}).get("name", "")
            file.write(f"{event.event_id} {name} {time.time():.6f}\n")
            file.flush()
