"""The relay: publishes the log rows whose writer did not publish them, in log order.

Rows with ``relay = true`` are events nobody holds in memory: those a
transaction emitted beyond ``PUBLISH_BUFFER`` (see :mod:`django_eventbus.capture.outbox`),
and rows written by the database itself (database capture). The relay reads
them after its cursor (a :class:`~django_eventbus.models.ConsumerCursor` named
``"django_eventbus.relay"``) through the partial index ``eventbus_relay``,
publishes them with ``bus.publish_many`` in id order and saves the cursor after
each batch. A crash between a publish and the cursor save publishes that batch
again: consumers deduplicate by ``event_id``.

Ids commit out of order: the relay never passes an id that is missing from the
log until the row after it is ``GAP_TIMEOUT`` seconds old (the listener's gap
rule, :func:`~django_eventbus.delivery.listener.gap_may_fill`), so a transaction still
committing is not skipped — unless, on PostgreSQL, no other session of the
database is inside a transaction (then the missing ids were rolled back: a
rolled back savepoint of a bulk job does not hold the relay for ``GAP_TIMEOUT``).

Who runs it and when:

* ``manage.py eventbus_listen`` runs one :class:`Relay` per process. On
  PostgreSQL only one of them is active per log database: it holds
  ``pg_try_advisory_lock`` on a connection of its own; the others retry every
  ``RELAY_INTERVAL`` seconds and take over when the holder's session ends. On
  other databases (SQLite) one listener process is assumed.
* The active relay is woken by a NOTIFY on :data:`WAKE_CHANNEL`, which writers
  that left relay rows send *after* commit, outside their transaction
  (:func:`wake_after_commit`, one per transaction), and polls the log every
  ``RELAY_INTERVAL`` seconds for writers outside Django. On SQLite: polling only.
* With the memory bus (one process), the process's bus runner owns a relay and a
  wake runs it on the runner's loop.

:class:`LogRelay` is the machinery (cursor, gap rule, lock, wake); :class:`Relay`
delivers to the bus. The stream relay (:mod:`django_eventbus.delivery.streams`) is another
``LogRelay``: it reads every row of the log, under a lock of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections

from django_eventbus.conf import conf, django_database_conninfo
from django_eventbus.db_commit import on_commit_state
from django_eventbus.events.backoff import backoff_delays
from django_eventbus.events.base import BaseEventBus
from django_eventbus.events.types import Event
from django_eventbus.models import StoredEvent

from .listener import EVENT_COLUMNS, _load_cursor, _save_cursor, event_from_row, gap_deadline, gap_may_fill

__all__ = [
    "CURSOR_NAME",
    "WAKE_CHANNEL",
    "LogRelay",
    "Relay",
    "is_wake_callback",
    "wake_after_commit",
    "wake_relay",
]

logger = logging.getLogger("django_eventbus")

#: The NOTIFY channel writers wake the relay on (payload: the database alias).
WAKE_CHANNEL = "eventbus_wake"
#: The relay's cursor in ConsumerCursor.
CURSOR_NAME = "django_eventbus.relay"
#: The advisory lock key of the active relay ("eventbus" as a 64-bit integer).
LOCK_KEY = int.from_bytes(b"eventbus", "big")


# -- waking it (writers) --------------------------------------------------------


def wake_relay(using: str | None = None) -> None:
    """Tell the relay of ``using``'s log that rows are waiting; never raises.

    Call it outside the writing transaction (after commit): a NOTIFY inside it would
    make the commit take PostgreSQL's global notify lock.
    """
    alias = using or conf.DATABASE_ALIAS
    try:
        from .runtime import get_runner

        if conf.raw_bus_config().get("backend") == "memory":
            get_runner().run_relay()  # the in-process relay: no other process sees this bus
            return
        connection = connections[alias]
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", [WAKE_CHANNEL, alias])
        # Other databases: the relay polls every RELAY_INTERVAL seconds.
    except Exception:
        logger.exception("waking the event relay failed; it finds the rows at its next poll")


class _Wake:
    """The on_commit callback that wakes the relay once for a transaction."""

    __slots__ = ("alias",)

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def __call__(self) -> None:
        wake_relay(self.alias)


def is_wake_callback(func: Callable[[], Any]) -> bool:
    """Whether an on_commit callback is the relay's wake (the outbox looks past it)."""
    return isinstance(func, _Wake)


def wake_after_commit(using: str | None = None) -> None:
    """Wake the relay after the current transaction commits (now, in autocommit).

    Call it for every write that leaves relay rows: it registers one callback per
    transaction (unless an enclosing savepoint level already has one), so a bulk
    job does not send a NOTIFY per row; a rolled back savepoint drops its own.
    """
    alias = using or conf.DATABASE_ALIAS
    connection = connections[alias]
    if not connection.in_atomic_block:
        wake_relay(alias)
        return
    state = on_commit_state(connection)
    if state is not None:
        current, pending = state
        # A wake at this level or an outer one runs whenever our rows commit.
        if any(isinstance(func, _Wake) and sids <= current for sids, func in pending):
            return
    connection.on_commit(_Wake(alias), robust=True)


# -- reading the log (sync; called through sync_to_async) --------------------------


def _read_pending(after: int, limit: int, relay_only: bool = True) -> list[tuple[int, datetime, Event]]:
    log = StoredEvent.objects.filter(relay=True) if relay_only else StoredEvent.objects.all()
    rows = log.filter(id__gt=after).order_by("id").values_list(*EVENT_COLUMNS)[:limit]
    return [(row[0], row[5], event_from_row(row)) for row in rows]


def _ids_missing(after: int, upto: int) -> bool:
    """Whether some id in ``(after, upto]`` is not (yet) visible in the log."""
    return StoredEvent.objects.filter(id__gt=after, id__lte=upto).count() < upto - after


def _start_position(name: str, relay_only: bool = True) -> int | None:
    cursor = _load_cursor(name)
    first = StoredEvent.objects.order_by("id").values_list("id", flat=True).first()
    if cursor is not None:
        if first is not None and cursor.position < first - 1:
            # Rows after the cursor were pruned: waiting on their ids as a gap would only
            # hold the relay back. A relay of the whole log lost them (say so); the bus
            # relay's cursor only stops on relay rows, so other pruned rows are normal.
            if relay_only:
                return first - 1
            logger.warning(
                "relay %s: log rows %d..%d were pruned before they were relayed; continuing from %d",
                name,
                cursor.position + 1,
                first - 1,
                first,
            )
            return first - 1
        return cursor.position
    # A new relay starts just below the oldest row of the log (None while it is empty):
    # every relay row is still unpublished, and pruned ids below are no gap to wait on.
    return None if first is None else first - 1


def _transactions_open() -> bool:
    """Whether a transaction that may hold a missing id could still commit.

    A missing id below a visible row belongs to a transaction still open, or to
    one rolled back (a savepoint too): on PostgreSQL, when no other session of
    this database is inside a transaction, every gap is permanent and the relay
    need not wait ``GAP_TIMEOUT`` for it. SQLite has one writer at a time: an id
    below a committed row can no longer commit. Other databases: assume one may.
    """
    connection = connections[StoredEvent.objects.db]
    if connection.vendor == "sqlite":
        return False
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        # xact_start is NULL for sessions of other roles without pg_read_all_stats:
        # they count as open (the safe side).
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            " AND (xact_start IS NOT NULL OR state IS NULL))"
        )
        row = cursor.fetchone()
    return bool(row and row[0])


def _ready(after: int, rows: list[tuple[int, datetime, Event]]) -> int:
    """How many of ``rows`` (relay rows after ``after``, by id) may be published now.

    Stops before the first row that has a missing id below it which may still
    commit; one count in the usual case (no gap), a bisection otherwise.
    """
    deadline = gap_deadline()
    start, done = after, 0
    while done < len(rows) and _ids_missing(start, rows[-1][0]):
        low, high = done, len(rows) - 1  # the first row with a gap below it is in [low, high]
        while low < high:
            middle = (low + high) // 2
            if _ids_missing(start, rows[middle][0]):
                high = middle
            else:
                low = middle + 1
        if gap_may_fill(True, rows[low][1], deadline) and _transactions_open():
            return low
        start, done = rows[low][0], low + 1  # an old gap: a rolled back or pruned id
    return len(rows)


# -- the relay itself ---------------------------------------------------------------


class LogRelay:
    """Sends log rows after its cursor somewhere, in log order; see the module docstring.

    A subclass says where (:meth:`deliver`), which rows (``relay_only``: the rows no
    writer published, or the whole log) and which advisory lock makes it exclusive.
    ``start()`` runs it in the background (exclusive per database and lock key on
    PostgreSQL, polling elsewhere); :meth:`publish_pending` runs one pass.
    """

    #: only rows with ``relay = true`` (the bus relay), or every row
    relay_only = True
    #: the advisory lock key of the active relay of this kind
    lock_key = LOCK_KEY
    application_name = "django_eventbus:relay"

    def __init__(
        self,
        *,
        interval: float | None = None,
        batch_size: int = 1000,
        name: str = CURSOR_NAME,
        using: str | None = None,
    ) -> None:
        self.interval = interval if interval is not None else conf.RELAY_INTERVAL
        self.batch_size = batch_size
        self.name = name
        self.using = using or conf.DATABASE_ALIAS
        self.position: int | None = None
        self.published = 0
        #: True while this relay holds the lock (always, where there is no lock).
        self.active = False
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._current: asyncio.Future[None] | None = None

    async def deliver(self, rows: list[tuple[int, Event]]) -> None:
        """Send ``(log id, event)`` pairs, in log order; raise if they may not all have gone."""
        raise NotImplementedError

    async def publish_pending(self) -> int:
        """Deliver the rows after the cursor that may be delivered now; returns how many."""
        async with self._lock:
            # Read every pass: another relay may have moved it while this one stood by.
            self.position = await sync_to_async(_start_position)(self.name, self.relay_only)
            if self.position is None:
                return 0
            read = sync_to_async(_read_pending)
            total = 0
            rows = await read(self.position, self.batch_size, self.relay_only)
            while True:
                ready = await sync_to_async(_ready)(self.position, rows) if rows else 0
                if not ready:
                    return total
                following = None
                if ready == self.batch_size:
                    # Read the next batch while this one is delivered: the ORM runs in its own thread.
                    following = asyncio.ensure_future(read(rows[-1][0], self.batch_size, self.relay_only))
                    following.add_done_callback(_retrieve)
                try:
                    await self.deliver([(row_id, event) for row_id, _, event in rows[:ready]])
                except BaseException:
                    if following is not None:
                        following.cancel()
                    raise
                self.position = rows[ready - 1][0]
                await sync_to_async(_save_cursor)(self.name, self.position, [])
                total += ready
                self.published += ready
                if following is None:
                    return total
                rows = await following

    def wake(self) -> None:
        """Run a pass now (call on the relay's event loop)."""
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._finish_pass()
        self.active = False
        # The ORM ran in asgiref's thread-sensitive executor: close that thread's connections.
        with contextlib.suppress(RuntimeError):  # at interpreter exit the executors are shut down
            await sync_to_async(connections.close_all)()

    async def _pass(self) -> None:
        # Shielded: stop() cancels the relay's task, but a pass that delivered rows must save
        # the cursor before the lock is released, or the next active relay delivers them again.
        self._current = asyncio.ensure_future(self._publish_logged())
        await asyncio.shield(self._current)

    async def _publish_logged(self) -> None:
        try:
            await self.publish_pending()
        except Exception:
            logger.exception("the event relay failed to publish; retrying in %gs", self.interval)

    async def _finish_pass(self) -> None:
        """Let a pass in flight (delivery and cursor save) finish, at most ``PUBLISH_TIMEOUT``."""
        if self._current is not None and not self._current.done():
            await asyncio.wait({self._current}, timeout=conf.PUBLISH_TIMEOUT)

    async def _run(self) -> None:
        vendor = await sync_to_async(lambda: connections[self.using].vendor)()
        if vendor == "postgresql":
            await self._run_exclusive()
            return
        self.active = True
        while True:
            await self._pass()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()

    async def _run_exclusive(self) -> None:
        import psycopg
        from psycopg import sql

        conninfo = await sync_to_async(django_database_conninfo)(self.using)
        delays = backoff_delays()
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, application_name=self.application_name
                )
                # The lock lives as long as this session: if the process dies or the
                # connection drops, a standby's next try takes it over.
                while not await _try_lock(conn, self.lock_key):
                    await asyncio.sleep(self.interval)  # a standby
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(WAKE_CHANNEL)))
                self.active = True
                logger.info("event relay active on database %r", self.using)
                delays = backoff_delays()
                notifier = asyncio.ensure_future(self._forward_notifies(conn))
                try:
                    while True:
                        await self._pass()
                        # Woken by a writer's NOTIFY or by wake(), or polling for writers outside Django.
                        await self._wait_for_wake(notifier)
                finally:
                    notifier.cancel()
                    with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                        await notifier
            except psycopg.Error as exc:  # the session (and with it the lock) is gone
                self.active = False
                delay = next(delays)
                logger.warning("event relay: database connection lost (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
            finally:
                self.active = False
                # Closing the session releases the lock: not before this relay's last pass
                # saved its cursor.
                await self._finish_pass()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def _forward_notifies(self, conn: Any) -> None:
        import psycopg

        async for _ in conn.notifies():
            self._wake.set()
        raise psycopg.OperationalError("the relay's notification stream ended")

    async def _wait_for_wake(self, notifier: asyncio.Future[Any]) -> None:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter, notifier}, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        self._wake.clear()
        if notifier.done():
            notifier.result()  # the session is gone: raises its psycopg error


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A read-ahead dropped after a failed delivery: its error (if any) is not news.
    if not future.cancelled():
        future.exception()


async def _try_lock(conn: Any, key: int) -> bool:
    row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", [key])).fetchone()
    return bool(row and row[0])


class Relay(LogRelay):
    """Publishes the log's relay rows on ``bus``, in order (the bus relay of ``eventbus_listen``)."""

    def __init__(self, bus: BaseEventBus, **options: Any) -> None:
        super().__init__(**options)
        self.bus = bus

    async def deliver(self, rows: list[tuple[int, Event]]) -> None:
        await self.bus.publish_many([event for _, event in rows])
