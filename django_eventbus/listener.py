"""Running consumers: live delivery from the bus, catch-up from the log, exactly once per consumer.

The transport (NOTIFY, pub/sub) is the fast path and loses messages while a
listener is down or reconnecting; the event log is the source of truth. Each
durable consumer keeps a cursor (:class:`~django_eventbus.models.ConsumerCursor`):

* ``position`` — every log row with ``id <= position`` was handled (or did not match);
* ``handled`` — event ids handled above ``position`` (live events whose rows
  catch-up has not passed yet), so a restart does not handle them again.

Catch-up reads the log after ``position`` on start, after every reconnect (the
bus's "connection restored" callback) and every ``CATCHUP_INTERVAL`` seconds,
and handles what the live path missed; both paths take the consumer's lock, so
a consumer handles one event at a time, and dedup by event id makes each event
count once. Log ids are allocated at INSERT but become visible at COMMIT, so a
lower id can appear after a higher one: ``position`` never passes a missing id
until the row after the gap is ``GAP_TIMEOUT`` seconds old (rolled-back
transactions leave permanent gaps).

The cursor is saved after every handled event (``checkpoint_every=1``, the
default), so a crash handles again at most the event that was in flight; a
consumer that tolerates repeats can checkpoint every N events instead, which
makes catch-up much faster (one cursor write per N events).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections, transaction

from . import signals, tracing
from .conf import conf
from .consumers import Consumer
from .events.backoff import backoff_delays
from .events.base import BaseEventBus
from .events.dispatch import call_handler
from .events.types import Event, EventType, Subscription
from .models import ConsumerCursor, DeadLetter, StoredEvent

__all__ = ["ConsumerRunner", "Listener", "event_from_row", "gap_deadline", "gap_may_fill"]

logger = logging.getLogger("django_eventbus")

#: in-memory dedup window (event ids) against late live copies of caught-up events
RECENT = 20_000


def gap_deadline() -> datetime:
    """Rows stamped after this moment may still see lower ids commit before them (``GAP_TIMEOUT``)."""
    return datetime.now(timezone.utc) - timedelta(seconds=conf.GAP_TIMEOUT)


def gap_may_fill(missing: bool, timestamp: datetime, deadline: datetime) -> bool:
    """Whether ids ``missing`` below a row stamped ``timestamp`` may still commit: then wait for them.

    Log ids are allocated at INSERT and become visible at COMMIT, so a gap is a
    transaction still running, or one rolled back (a permanent gap). A gap before a
    row older than ``deadline`` is taken as permanent.
    """
    return missing and timestamp > deadline


class ConsumerRunner:
    """One consumer: its lock, its cursor, retries and dead letters."""

    def __init__(
        self,
        consumer: Consumer,
        *,
        persist: bool,
        start_after: int | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.consumer = consumer
        self.persist = persist
        self.lock = asyncio.Lock()
        self.position: int | None = start_after
        self.handled: dict[str, None] = {}  # ordered set: ids handled above position
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.batch_size = batch_size
        self.handled_count = 0
        self.failed_count = 0
        self._dirty = False
        self._func = _callable(consumer)
        # Set once the first catch-up is done (Listener.start): live events wait for it, so a
        # restarted consumer handles its backlog before the events that came after it, in log
        # order (otherwise the first live events would overtake the backlog).
        self.resumed = asyncio.Event()

    # -- cursor ------------------------------------------------------------------

    async def load(self) -> None:
        if not self.persist:
            return
        cursor = await sync_to_async(_load_cursor)(self.consumer.name)
        if cursor is None:
            # A new consumer starts at the end of the log (like a new Kafka group at
            # "latest"): it does not replay history unless asked (--since).
            start = self.position if self.position is not None else await sync_to_async(_last_id)()
            self.position = start
            await sync_to_async(_save_cursor)(self.consumer.name, start, [])
        else:
            self.position = cursor.position if self.position is None else self.position
            self.handled = dict.fromkeys(cursor.handled or [])

    async def save(self) -> None:
        if self.persist and self._dirty and self.position is not None:
            self._dirty = False
            await sync_to_async(_save_cursor)(self.consumer.name, self.position, list(self.handled))

    # -- handling ------------------------------------------------------------------

    def seen(self, event_id: str) -> bool:
        return event_id in self.handled or event_id in self.recent

    async def on_live(self, event: Event) -> None:
        """Handler subscribed on the bus."""
        await self.resumed.wait()
        async with self.lock:
            if self.seen(event.event_id):
                return
            if not self.persist or self.position is None:
                await self._handle(event)
                return
            log_id = await sync_to_async(_log_id)(event.event_id)
            if log_id is not None and log_id <= self.position:
                return  # handled before: a re-published event, or a late copy after catch-up
            await self._handle(event)
            # Usually the event is the next row of the log: then the position moves and
            # the cursor stays small. Otherwise (a gap before it) its id is remembered.
            if log_id is not None and log_id == self.position + 1:
                self.position = log_id
            elif log_id is None or log_id > self.position:
                self.handled[event.event_id] = None
            self._dirty = True
            await self.save()

    async def _handle(self, event: Event) -> None:
        consumer = self.consumer
        delays = backoff_delays(initial=consumer.retry_delay, maximum=30.0)
        attempts = 0
        while True:
            attempts += 1
            started = time.perf_counter()
            try:
                with tracing.handle_span(consumer.name, event):
                    await call_handler(self._func, event)
            except Exception as exc:
                logger.warning(
                    "consumer %s failed on event %s (%s), attempt %d of %d",
                    consumer.name,
                    event.event_id,
                    event.topic,
                    attempts,
                    consumer.retries + 1,
                    exc_info=True,
                )
                if attempts > consumer.retries:
                    self.failed_count += 1
                    logger.error(
                        "consumer %s gave up on event %s after %d attempts: dead letter recorded",
                        consumer.name,
                        event.event_id,
                        attempts,
                    )
                    await sync_to_async(_dead_letter)(consumer.name, event, exc, attempts)
                    signals.failed(consumer.name, event, exc, attempts, dead_lettered=True)
                    break
                signals.failed(consumer.name, event, exc, attempts, dead_lettered=False)
                await asyncio.sleep(next(delays))
            else:
                self.handled_count += 1
                signals.handled(consumer.name, event, time.perf_counter() - started)
                break
        self.recent[event.event_id] = None
        if len(self.recent) > RECENT:
            self.recent.popitem(last=False)

    # -- catch-up ------------------------------------------------------------------

    async def _skip_backlog(self) -> None:
        """Jump to the end of the log when the consumer's ``skip_backlog`` rule says so."""
        rule = self.consumer.skip_backlog
        if rule is None or not self.persist or self.position is None:
            return
        if not await sync_to_async(rule)(self.position, len(self.handled)):
            return
        async with self.lock:
            # Read under the lock: every event handled so far has a log id at or below the
            # end, so the handled ids can all go.
            end = await sync_to_async(_last_id)()
            if self.position is None or end <= self.position:
                return
            logger.warning(
                "consumer %s skipped its backlog: log ids %d to %d were not handled",
                self.consumer.name,
                self.position + 1,
                end,
            )
            self.position = end
            self.handled.clear()
            self._dirty = True
            await self.save()

    async def catch_up(self) -> int:
        """Handle what the log has after ``position`` that was not handled; returns how many."""
        if self.position is None:
            return 0
        await self._skip_backlog()
        total = 0
        while True:
            rows = await sync_to_async(_read_ids)(self.position, self.batch_size)
            if not rows:
                break
            wanted = [r[0] for r in rows if self.consumer.matches(r[2]) and not self.seen(r[1])]
            events = await sync_to_async(_read_events)(wanted) if wanted else {}
            deadline = gap_deadline()
            async with self.lock:
                expected = self.position + 1
                blocked = False
                unsaved = 0
                for row_id, event_id, _topic, timestamp in rows:
                    if not blocked and gap_may_fill(row_id != expected, timestamp, deadline):
                        blocked = True  # ids below row_id may still commit: keep position here
                    event = events.get(row_id)
                    handle = event is not None and not self.seen(event_id)
                    if handle:
                        assert event is not None
                        await self._handle(event)
                        total += 1
                        unsaved += 1
                    if not blocked:
                        self.position = row_id
                        self.handled.pop(event_id, None)
                    elif handle:
                        self.handled[event_id] = None
                    expected = row_id + 1
                    self._dirty = True
                    if unsaved >= self.consumer.checkpoint_every:
                        # The cursor is saved before the next event is handled, so a crash
                        # handles again at most ``checkpoint_every`` events (1 by default).
                        await self.save()
                        unsaved = 0
                await self.save()
            if len(rows) < self.batch_size or blocked:
                break
        return total


class Listener:
    """Subscribes consumers on a bus and keeps them caught up with the log."""

    def __init__(
        self,
        bus: BaseEventBus,
        consumers: Iterable[Consumer],
        *,
        catch_up: bool = True,
        start_after: int | None = None,
        interval: float | None = None,
    ) -> None:
        self.bus = bus
        self.catch_up_enabled = catch_up and conf.STORE_EVENTS
        self.interval = interval if interval is not None else float(conf.get("CATCHUP_INTERVAL"))
        self.runners = [
            ConsumerRunner(c, persist=c.durable and self.catch_up_enabled, start_after=start_after)
            for c in consumers
        ]
        self._subscriptions: list[Subscription] = []
        self._poller: asyncio.Task[None] | None = None
        self._unregister: Callable[[], None] | None = None
        self._wake = asyncio.Event()
        self._catching_up = asyncio.Lock()

    async def start(self) -> None:
        for runner in self.runners:
            if self.catch_up_enabled and (runner.persist or runner.position is not None):
                await runner.load()
            else:
                runner.position = None
            consumer = runner.consumer
            pattern = consumer.pattern if consumer.is_pattern else None
            self._subscriptions.append(
                await self.bus.subscribe(consumer.pattern, runner.on_live, pattern=pattern)
            )
        if self.catch_up_enabled:
            self._unregister = self.bus.on_connection_restored(self._wake.set)
            await self.catch_up()
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        for runner in self.runners:
            runner.resumed.set()

    async def catch_up(self) -> int:
        async with self._catching_up:
            total = 0
            for runner in self.runners:
                try:
                    total += await runner.catch_up()
                except Exception:
                    logger.exception("catch-up of consumer %s failed; will retry", runner.consumer.name)
            if total:
                logger.info("caught up %d event(s) from the log", total)
            return total

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.catch_up()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking events, let running handlers finish (up to ``timeout``), save cursors."""
        if self._unregister is not None:
            self._unregister()
        for subscription in self._subscriptions:
            await subscription.cancel()
        self._subscriptions.clear()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        deadline = time.monotonic() + timeout
        for runner in self.runners:
            try:
                await asyncio.wait_for(runner.lock.acquire(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                logger.warning("consumer %s still busy at shutdown", runner.consumer.name)
                continue
            try:
                await runner.save()
            finally:
                runner.lock.release()
        # The ORM ran in asgiref's thread-sensitive executor: close that thread's connections.
        with contextlib.suppress(RuntimeError):  # at interpreter exit the executors are shut down
            await sync_to_async(connections.close_all)()


def _callable(consumer: Consumer) -> Callable[[Event], Any]:
    if consumer.is_async:
        return consumer.func

    def call(event: Event) -> Any:
        try:
            return consumer.func(event)
        finally:
            _drop_broken_connections()

    # One worker thread for sync consumers (asgiref's thread-sensitive executor), so the
    # ORM keeps one persistent connection per listener process, as in a sync view.
    return sync_to_async(call, thread_sensitive=True)


def _drop_broken_connections() -> None:
    # Not close_old_connections(): with CONN_MAX_AGE=0 (Django's default) it closes the
    # connection after every call, and reconnecting per event costs milliseconds. Only a
    # connection that saw an error and no longer answers is replaced.
    for conn in connections.all(initialized_only=True):
        if conn.errors_occurred and not conn.in_atomic_block and not conn.is_usable():
            conn.close()


# -- database access (sync; called through sync_to_async) --------------------------


def _last_id() -> int:
    """The id of the newest log row — on PostgreSQL, the last id its sequence handed out.

    A consumer that starts "now" must not wait GAP_TIMEOUT on the ids below the first
    row it sees (pruned rows, rolled-back inserts): the sequence says where "now" is.
    """
    last = StoredEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
    connection = connections[StoredEvent.objects.db]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", [StoredEvent._meta.db_table])
            (sequence,) = cursor.fetchone()
            if sequence:
                # The name comes from the catalogue (already quoted as needed), not from input.
                cursor.execute(f"SELECT last_value, is_called FROM {sequence}")
                value, called = cursor.fetchone()
                last = max(last, value if called else value - 1)
    elif connection.vendor == "sqlite":
        # AUTOINCREMENT keeps the last id handed out in sqlite_sequence.
        with connection.cursor() as cursor:
            cursor.execute("SELECT seq FROM sqlite_sequence WHERE name = %s", [StoredEvent._meta.db_table])
            row = cursor.fetchone()
            if row is not None:
                last = max(last, row[0])
    return int(last)


def _load_cursor(name: str) -> ConsumerCursor | None:
    return ConsumerCursor.objects.filter(name=name).first()


def _save_cursor(name: str, position: int, handled: list[str]) -> None:
    # One UPDATE (update_or_create would lock, select and update: four round trips).
    if not ConsumerCursor.objects.filter(name=name).update(position=position, handled=handled):
        ConsumerCursor.objects.create(name=name, position=position, handled=handled)


def _log_id(event_id: str) -> int | None:
    return StoredEvent.objects.filter(event_id=event_id).values_list("id", flat=True).first()


def _read_ids(after: int, limit: int) -> list[tuple[int, str, str, datetime]]:
    return list(
        StoredEvent.objects.filter(id__gt=after)
        .order_by("id")
        .values_list("id", "event_id", "topic", "timestamp")[:limit]
    )


def _read_events(ids: list[int]) -> dict[int, Event]:
    # values_list, not model instances: catch-up reads many rows and only needs the events.
    rows = StoredEvent.objects.filter(id__in=ids).values_list(*EVENT_COLUMNS)
    return {row[0]: event_from_row(row) for row in rows}


#: The log columns :func:`event_from_row` reads, in its order.
EVENT_COLUMNS = (
    "id", "event_id", "type", "topic", "payload", "timestamp", "source", "correlation_id", "metadata"
)  # fmt: skip


def event_from_row(row: Sequence[Any]) -> Event:
    """The event of a log row read as ``values_list(*EVENT_COLUMNS)``."""
    return Event(
        type=EventType(row[2]),
        topic=row[3],
        payload=row[4] or {},
        timestamp=row[5],
        event_id=row[1],
        source=row[6],
        correlation_id=row[7],
        metadata=row[8] or {},
    )


def _dead_letter(name: str, event: Event, exc: BaseException, attempts: int) -> None:
    with transaction.atomic():
        DeadLetter.objects.create(
            consumer=name,
            event_id=event.event_id,
            topic=event.topic,
            event=event.to_dict(),
            error="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-10_000:],
            attempts=attempts,
        )


def position_for_since(since: str) -> int:
    """The log position just before an event id or an ISO 8601 time (``--since``)."""
    row = StoredEvent.objects.filter(event_id=since).values_list("id", flat=True).first()
    if row is not None:
        return row
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise ValueError(f"--since {since!r} is neither a logged event id nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    first = (
        StoredEvent.objects.filter(timestamp__gte=moment).order_by("id").values_list("id", flat=True).first()
    )
    return (first - 1) if first is not None else _last_id()
