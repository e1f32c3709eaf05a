"""The event bus counters of this process, for whatever exports your metrics.

:func:`get_stats` returns a plain dict; nothing here imports a metrics
library, so Prometheus and OpenTelemetry stay your choice (and your
dependency). The counters only ever grow while the process lives; they
restart from zero with the process (or when a settings change rebuilds the
bus), which both Prometheus and OpenTelemetry treat as a counter reset.

======================  ==========================================================
``published``           events handed to the transport by this process
``delivered``           handler calls that returned normally (subscriptions, consumers)
``dropped``             events dropped because a subscription's queue was full
                        (consumers recover them from the event log)
``handler_errors``      handler calls that raised (logged with the event id)
``invalid_messages``    transport messages that were not valid events (ignored)
``reconnects``          times the transport connection was restored
======================  ==========================================================

Each process counts its own work: the web processes mostly publish, the
``eventbus_listen`` processes deliver. Export from each and sum in queries.

**Prometheus**: :mod:`django_eventbus.metrics.prometheus` (extra ``[prometheus]``)
exports these counters and more (per topic and consumer, latencies, consumer lag).

**OpenTelemetry** (``opentelemetry-api``), observable counters whose callback
reads the same dict::

    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation

    from django_eventbus.metrics import STAT_DESCRIPTIONS, get_stats

    meter = metrics.get_meter("django_eventbus")


    def observe(name):
        def callback(options: CallbackOptions):
            yield Observation(get_stats()[name])

        return callback


    for name, description in STAT_DESCRIPTIONS.items():
        meter.create_observable_counter(
            f"eventbus.{name}", callbacks=[observe(name)], description=description
        )
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

from django.db import connections
from django.db.models import Model

from django_eventbus.events.dispatch import BusStats

__all__ = ["STAT_DESCRIPTIONS", "STAT_NAMES", "estimated_rows", "get_stats", "register_bus"]

#: The counter names, in a stable order.
STAT_NAMES: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(BusStats))

#: One line of help per counter (metric descriptions).
STAT_DESCRIPTIONS: dict[str, str] = {
    "published": "Events handed to the transport by this process.",
    "delivered": "Event handler calls that returned normally.",
    "dropped": "Events dropped because a subscription queue was full (recovered from the log by consumers).",
    "handler_errors": "Event handler calls that raised.",
    "invalid_messages": "Transport messages that were not valid events.",
    "reconnects": "Times the event bus transport connection was restored.",
}

# Buses other than the process bus (e.g. the one eventbus_listen builds) count too.
# Weak references: a closed and forgotten bus must not be kept alive by metrics.
_extra_buses: weakref.WeakSet[Any] = weakref.WeakSet()


def register_bus(bus: Any) -> None:
    """Count ``bus`` (anything with a ``stats`` :class:`BusStats`) in :func:`get_stats`."""
    _extra_buses.add(bus)


def get_stats() -> dict[str, int]:
    """This process's event bus counters (see the module docstring), summed over its buses.

    Cheap and side-effect free: it never connects a bus; before the first
    publish or subscribe every counter is 0.
    """
    totals = dict.fromkeys(STAT_NAMES, 0)
    for bus in _buses():
        for name, value in bus.stats.as_dict().items():
            if name in totals:
                totals[name] += value
    return totals


def _buses() -> list[Any]:
    from django_eventbus.delivery import runtime

    buses: list[Any] = list(_extra_buses)
    # Read the runner without creating it: reading metrics must not open connections.
    runner = runtime._runner
    process_bus = getattr(runner, "_bus", None) if runner is not None else None
    if process_bus is not None and process_bus not in buses:
        buses.append(process_bus)
    return buses


def estimated_rows(model: type[Model], using: str = "default") -> int | None:
    """PostgreSQL's estimate of a table's row count, ``None`` on other databases or before any ANALYZE.

    Free (one catalog row) where ``COUNT(*)`` reads the whole table; autovacuum
    keeps it within a few percent. Useful as a gauge of the event log's size::

        estimated_rows(StoredEvent)
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", [model._meta.db_table]
        )
        row = cursor.fetchone()
    # -1 means "never vacuumed or analyzed": no estimate yet.
    return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None
