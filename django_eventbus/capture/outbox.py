"""From "this happened" to "it is recorded and will be published once committed".

:func:`emit` is the one path every event of the Django layer takes (model
signals, bulk helpers, ``publish()``). It uses Django's public transaction API:

1. the log rows are INSERTed at once, in the caller's transaction (so code in
   the transaction sees them in ``StoredEvent``, and they commit or roll back
   with the change);
2. the events wait in a buffer and are published after commit, from a
   ``transaction.on_commit(..., robust=True)`` callback, through the process's
   bus — whatever the transport (``postgres://`` on Django's own database too:
   no NOTIFY inside the writing transaction, so committing never takes
   PostgreSQL's global notify lock).

A rolled back savepoint discards exactly its own events: the buffer is one
``on_commit`` callback per savepoint level, which Django drops with the
savepoint. One callback per level, not per event, so that the levels of one
transaction share one count of buffered events (``PUBLISH_BUFFER`` below):
Django's public API cannot tell which callbacks belong to the current
transaction. Finding the level's callback again needs two undocumented
connection attributes; they are read in one place,
:func:`~django_eventbus.db_commit.on_commit_state`,
which falls back to one callback per :func:`emit` call if a Django version lacks
them (``PUBLISH_BUFFER`` then bounds each call, not the transaction). Speed is
not the reason: ``bench/bench_commit_callbacks.py`` measures both (bench/README.md).

Bounded memory: a transaction keeps at most ``PUBLISH_BUFFER`` events for
after-commit publishing. Events emitted beyond it are inserted with
``relay = true`` and not kept; after commit (once the buffered events reached
the transport, so order holds) the writer wakes the relay
(:mod:`django_eventbus.delivery.relay`), which publishes them from the log. With
``STORE_EVENTS`` off there is no log to relay from, so everything is buffered.

Outside a transaction (autocommit) Django has already committed the change when
the signal fires: the rows are written (in one transaction of their own) and
published right away.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from django_eventbus.conf import conf
from django_eventbus.db_commit import on_commit_state
from django_eventbus.delivery.relay import is_wake_callback, wake_after_commit
from django_eventbus.delivery.runtime import get_runner
from django_eventbus.events import Event

from .store import record

__all__ = ["emit", "flush_pending", "on_commit_state"]

logger = logging.getLogger("django_eventbus")


class _Transaction:
    """What the savepoint levels of one transaction share: how many events are buffered."""

    __slots__ = ("buffered",)

    def __init__(self) -> None:
        self.buffered = 0


class _Flush:
    """The on_commit callback of one savepoint level: its buffered events."""

    __slots__ = ("events", "txn", "wait")

    def __init__(self, txn: _Transaction) -> None:
        self.txn = txn
        self.events: list[Event] = []
        # The relay will publish this transaction's overflow once woken: everything
        # buffered must have reached the transport by then, so events keep log order.
        self.wait = False

    def __call__(self) -> None:
        _publish_now(self.events, wait=self.wait)


def emit(events: Sequence[Event], using: str | None = None) -> None:
    """Record ``events`` and publish them when the current transaction commits."""
    if not events:
        return
    alias = using or conf.DATABASE_ALIAS
    connection = connections[alias]
    if not connection.in_atomic_block:
        # Autocommit: the change is already committed. One transaction for the rows
        # (several INSERTs for a bulk write), published when it commits.
        with transaction.atomic(using=alias):
            emit(events, alias)
        return
    flush = _current_flush(connection)
    keep = len(events)
    if conf.STORE_EVENTS:
        keep = max(0, min(keep, conf.PUBLISH_BUFFER - flush.txn.buffered))
        record(events[:keep], connection)
        if keep < len(events):
            record(events[keep:], connection, relay=True)
            flush.wait = True
            wake_after_commit(alias)
    flush.events.extend(events[:keep])
    flush.txn.buffered += keep


def _current_flush(connection: BaseDatabaseWrapper) -> _Flush:
    # Reuse the last callback while we are at the same savepoint level, so a rolled
    # back savepoint discards exactly its own events and events keep their order
    # across levels; a new level shares the transaction's buffer count.
    state = on_commit_state(connection)
    txn: _Transaction | None = None
    if state is not None:
        current, pending = state
        newest = True  # no other callback registered after it (the relay's wake aside)
        for sids, func in pending:
            if is_wake_callback(func):
                continue
            if isinstance(func, _Flush):
                if newest and sids == current:
                    return func
                txn = func.txn
                break
            newest = False
    flush = _Flush(txn or _Transaction())
    connection.on_commit(flush, robust=True)
    return flush


def _publish_now(events: list[Event], wait: bool = False) -> None:
    try:
        runner = get_runner()
        if events:
            runner.publish_many(events, wait=wait)
        elif wait:
            runner.flush(conf.PUBLISH_TIMEOUT)
    except Exception:
        # The change is committed: never turn a transport failure into a failed request.
        # The rows are in the log (with STORE_EVENTS) and listeners catch up from it.
        logger.exception(
            "publishing %d event(s) after commit failed (first: %s)",
            len(events),
            events[0].event_id if events else "-",
        )


def flush_pending(timeout: float = 10.0) -> None:
    """Wait until events handed to the bus so far were published (useful in tests)."""
    get_runner().flush(timeout)
