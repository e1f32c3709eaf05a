"""From "this happened" to "it is recorded and will be published once committed".

:func:`emit` is the one path every event of the Django layer takes (model
signals, bulk helpers, ``publish()``).

Inside a transaction (``atomic``, ``ATOMIC_REQUESTS``) the events wait in a
buffer until the transaction commits:

1. right before COMMIT, in the same transaction, the log rows are written (and,
   with the PostgreSQL bus on Django's own database, the NOTIFYs ride in that
   same statement). On psycopg 3 the COMMIT itself is appended to that
   statement, so a tracked save costs no round trip more than an untracked one
   (round trips are most of the price of a save: 3 for ``BEGIN; INSERT;
   COMMIT``). The rows exist if and only if the change commits, and PostgreSQL
   delivers the NOTIFYs at that commit or never;
2. after commit the other transports publish the buffer.

A rolled back savepoint discards exactly its own events: the buffer is kept as
one ``on_commit`` callback per savepoint level, which Django drops with the
savepoint. (One callback per level, not per event: Django drains that queue with
``list.pop(0)``, quadratic for a bulk job with 100k events.)

Django has no "before commit" signal, so the write is hooked into the
connection's ``_commit`` (see :func:`_hook_commit`). If a commit bypasses it
(e.g. ``TestCase.captureOnCommitCallbacks(execute=True)``, which runs the
callbacks without committing), the callback writes the rows itself before
publishing. Outside a transaction (autocommit) Django has already committed the
change when the signal fires: the rows are written and published at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
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

    __slots__ = ("connection", "events", "via_database", "written")

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        self.events: list[Event] = []
        self.written = False  # set once the log rows / NOTIFYs went out in the transaction
        self.via_database = False  # the NOTIFYs were the transport: nothing to publish after commit

    def __call__(self) -> None:
        if not self.written:
            # The commit did not go through the hook (the callbacks are being run by hand).
            _write(self.events, self.connection, [self])
        if not self.via_database:
            _publish_now(self.events)


def emit(events: Sequence[Event], using: str | None = None) -> None:
    """Record ``events`` and publish them when the current transaction commits."""
    if not events:
        return
    connection = connections[using or conf.DATABASE_ALIAS]
    if connection.in_atomic_block:
        _hook_commit(connection)
        _current_flush(connection).events.extend(events)
        return
    # Autocommit: the change is already committed.
    flush = _Flush(connection)
    flush.events.extend(events)
    flush()


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
    flush = _Flush(connection)
    connection.on_commit(flush)
    return flush


def _hook_commit(connection: BaseDatabaseWrapper) -> None:
    """Make this connection write the buffered events right before it commits.

    Django has no pre-commit hook; ``BaseDatabaseWrapper.commit()`` calls
    ``self._commit()``, which this shadows on the instance (once per connection
    object, chaining whatever was there). ``atomic`` reaches it with the atomic
    block already closed, so the write may use a cursor like any query.
    """
    wrapper: Any = connection  # _commit is not in the type stubs: it is Django's internal
    if getattr(wrapper, "_eventbus_hooked", False):
        return
    commit: Callable[[], Any] = wrapper._commit

    def _commit() -> Any:
        # run_on_commit holds (savepoint ids, callback, robust) for the callbacks still due.
        flushes = [
            entry[1]
            for entry in connection.run_on_commit
            if isinstance(entry[1], _Flush) and not entry[1].written
        ]
        if flushes:
            try:
                committed = _write([e for f in flushes for e in f.events], connection, flushes, commit=True)
            except BaseException:
                # atomic() only rolls back on DatabaseError; leave no half-open transaction.
                with contextlib.suppress(Exception):
                    connection.rollback()
                raise
            if committed:
                return None  # psycopg's commit() is a no-op on an idle connection; skip it too
        return commit()

    wrapper._commit = _commit
    wrapper._eventbus_hooked = True


def _write(
    events: list[Event], connection: BaseDatabaseWrapper, flushes: list[_Flush], commit: bool = False
) -> bool:
    """Write the log rows and in-database NOTIFYs of ``events``; True if this also committed."""
    notes = db_notifications(events, connection)
    committed = record(events, connection, notes or (), store=conf.STORE_EVENTS, commit=commit)
    for flush in flushes:
        flush.written = True
        flush.via_database = notes is not None
    return committed


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
