"""From "this happened" to "it is recorded and will be published once committed".

:func:`emit` is the one path every event of the Django layer takes (model
signals, bulk helpers, ``publish()``):

1. the log rows are written now, in the caller's transaction, so they exist
   if and only if the change commits;
2. with the PostgreSQL bus on Django's own database, the NOTIFYs go in the
   same statement: PostgreSQL delivers them at commit and drops them on
   rollback (of a savepoint too), so "committed" and "published" cannot differ;
3. otherwise the events wait in a buffer that is published after commit.
   One ``on_commit`` callback per transaction (per savepoint level) rather than
   one per event: Django drains that queue with ``list.pop(0)``, quadratic for
   a bulk job with 100k events.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

from .conf import conf
from .events import Event
from .runtime import get_runner
from .store import record

__all__ = ["emit", "flush_pending"]

logger = logging.getLogger("django_eventbus")


class _Flush:
    """The on_commit callback of one transaction (or savepoint level): its buffered events."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self) -> None:
        _publish_now(self.events)


def emit(events: Sequence[Event], using: str | None = None) -> None:
    """Record ``events`` and publish them when the current transaction commits."""
    if not events:
        return
    connection = connections[using or conf.DATABASE_ALIAS]
    notes = db_notifications(events, connection)
    if notes is not None:
        # The database is the transport: rows and NOTIFYs commit (or roll back) together.
        record(events, connection, notes, store=conf.STORE_EVENTS)
        return
    if conf.STORE_EVENTS:
        record(events, connection)
    if not connection.in_atomic_block:
        _publish_now(list(events))  # autocommit: the change is already committed
        return
    flush = _current_flush(connection)
    flush.events.extend(events)


def _current_flush(connection: BaseDatabaseWrapper) -> _Flush:
    # Reuse the last callback while we are at the same savepoint level, so a rolled
    # back savepoint discards exactly its own events (Django drops its callbacks) and
    # events keep their order across levels. run_on_commit holds (sids, func, robust).
    # ``None`` marks an atomic(savepoint=False) block (Django's deletion collector uses
    # one): it cannot roll back on its own, so it is the same level as its parent.
    sids = set(connection.savepoint_ids) - {None}
    pending = connection.run_on_commit
    if pending:
        last_sids, last_func = pending[-1][0], pending[-1][1]
        if isinstance(last_func, _Flush) and set(last_sids) - {None} == sids:
            return last_func
    flush = _Flush()
    connection.on_commit(flush)
    return flush


def _publish_now(events: list[Event]) -> None:
    try:
        get_runner().publish_many(events)
    except Exception:
        # The change is committed: never turn a transport failure into a failed request.
        # The rows are in the log (with STORE_EVENTS) and listeners catch up from it.
        logger.exception(
            "publishing %d event(s) after commit failed (first: %s)", len(events), events[0].event_id
        )


def flush_pending(timeout: float = 10.0) -> None:
    """Wait until events handed to the bus so far were published (useful in tests)."""
    get_runner().flush(timeout)


def db_notifications(
    events: Sequence[Event], connection: BaseDatabaseWrapper
) -> list[tuple[str, str]] | None:
    """NOTIFY pairs when the bus is PostgreSQL on this very database, else ``None``."""
    if not conf.uses_django_database():
        return None
    if connection.vendor != "postgresql" or connection.alias != conf.DATABASE_ALIAS:
        return None
    encoder = _encoder(conf.raw_bus_config().get("channel_prefix", "events"))
    notes: list[tuple[str, str]] = []
    for event in events:
        notes.extend(encoder.notifications_for(event))
    return notes


@lru_cache(maxsize=8)
def _encoder(channel_prefix: str) -> Any:
    from .events.postgres import PostgresEventBus

    # Never connected: only used to encode NOTIFY payloads exactly as the backend does.
    return PostgresEventBus(connection_string="", channel_prefix=channel_prefix)
