"""Writing events to the log, inside the caller's transaction.

The rows of a batch go in one multi-row ``INSERT`` (a parameterised statement;
only table and column names, from the model, are quoted in), a few hundred rows a
statement so the parameter count stays within every backend's limit. Nothing
else rides in that statement: the log row is written when the event is emitted,
in the transaction of the change, and publishing happens after commit
(:mod:`django_eventbus.capture.outbox`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from django_eventbus.events import Event
from django_eventbus.events.codec import dumps
from django_eventbus.models import StoredEvent

__all__ = ["record"]

_COLUMNS = (
    "event_id",
    "type",
    "topic",
    "payload",
    "timestamp",
    "source",
    "correlation_id",
    "metadata",
    "relay",
)
# Rows per INSERT: PostgreSQL allows 65,535 parameters a statement; SQLite's limit is
# read from the connection (bulk_batch_size).
_BATCH = 500


def record(events: Sequence[Event], connection: BaseDatabaseWrapper, *, relay: bool = False) -> None:
    """Insert ``events`` into the log on ``connection``, in its current transaction.

    ``relay`` marks rows the writer will not publish itself: the relay
    (:mod:`django_eventbus.delivery.relay`) publishes them from the log.
    """
    if not events:
        return
    size = max(1, min(_BATCH, connection.ops.bulk_batch_size(list(_COLUMNS), list(events[:_BATCH]))))
    with connection.cursor() as cursor:
        for start in range(0, len(events), size):
            cursor.execute(*_insert(events[start : start + size], connection, relay))


def _insert(batch: Sequence[Event], connection: BaseDatabaseWrapper, relay: bool) -> tuple[str, list[Any]]:
    qn = connection.ops.quote_name
    table = qn(StoredEvent._meta.db_table)
    json_cast = "::jsonb" if connection.vendor == "postgresql" else ""
    row = f"(%s, %s, %s, %s{json_cast}, %s, %s, %s, %s{json_cast}, %s)"
    params: list[Any] = []
    for event in batch:
        params += [
            event.event_id,
            event.type.value,
            event.topic,
            dumps(event.payload),
            connection.ops.adapt_datetimefield_value(event.timestamp),
            event.source,
            event.correlation_id,
            dumps(event.metadata),
            relay,
        ]
    columns = ", ".join(qn(c) for c in _COLUMNS)
    return f"INSERT INTO {table} ({columns}) VALUES {', '.join([row] * len(batch))}", params
