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

Each durable consumer is run by one listener process at a time, the holder of its
lease (:mod:`django_eventbus.delivery.leases`); other listeners stand by, ignore its live
events and take over when the lease is released or expires, resuming from the
saved cursor. Every cursor write is fenced by the lease's generation: a write that
matches no row means the lease was lost, and the runner stops handling at once.

The cursor is saved after every live event, and during catch-up every
``checkpoint_every`` events or ``checkpoint_interval`` seconds (1,000 / 1 s by
default) — or after each event when the batch read is shorter than that (the head of
the log, events the live path lagged behind or lost a moment ago): a crash repeats at
most the event in flight, or that window of a longer backlog. ``atomic=True``
consumers commit the cursor in the handler's transaction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import connections, transaction
from django.db.models import Min, Q

from django_eventbus import signals, tracing
from django_eventbus.conf import conf
from django_eventbus.events.backoff import backoff_delays
from django_eventbus.events.base import BaseEventBus
from django_eventbus.events.dispatch import call_handler
from django_eventbus.events.types import Event, EventType, Subscription
from django_eventbus.models import ConsumerCursor, DeadLetter, StoredEvent

from . import leases, partitions
from .consumers import Consumer

__all__ = ["ConsumerRunner", "LeaseLost", "Listener", "event_from_row", "gap_deadline", "gap_may_fill"]

logger = logging.getLogger("django_eventbus")

#: in-memory dedup window (event ids) against late live copies of caught-up events
RECENT = 20_000
#: seconds between a standby's attempts to take a consumer's lease (one cheap UPDATE each)
STANDBY_RETRY = 0.25
T = TypeVar("T")
#: a fenced cursor write: (name, owner, generation, position, handled)
Fence = tuple[str, str, int, int, list[str]]
#: log rows (id, event_id, topic, timestamp), and the events of those to handle by id
Rows = list[tuple[int, str, str, datetime]]
Batch = tuple[Rows, dict[int, Event]]


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


class LeaseLost(Exception):
    """A fenced cursor write matched no row: another listener owns the consumer now."""


class ConsumerRunner:
    """One consumer: its lease, its lock, its cursor, retries and dead letters."""

    def __init__(
        self,
        consumer: Consumer,
        *,
        persist: bool,
        start_after: int | None = None,
        batch_size: int = 5000,
        owner: str | None = None,
        lease_executor: ThreadPoolExecutor | None = None,
        partition: int | None = None,
    ) -> None:
        self.consumer = consumer
        self.persist = persist
        #: which partition of a partitioned consumer this runner handles (None: all its events)
        self.partition = partition
        #: the cursor's and lease's name: the consumer's, or its partition's (``"name#2/4"``)
        self.name = (
            consumer.name
            if partition is None
            else partitions.cursor_name(consumer.name, partition, consumer.partitions)
        )
        #: durable consumers are leased: this process handles them only while it owns them
        self.lease = leases.Lease(self.name, owner or leases.new_owner()) if persist else None
        self.lock = asyncio.Lock()
        self.position: int | None = start_after
        self.handled: dict[str, None] = {}  # ordered set: ids handled above position
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.batch_size = batch_size
        self.handled_count = 0
        self.failed_count = 0
        self._start_after = start_after
        self._dirty = False
        self._saved_at = time.monotonic()
        self._func = _callable(consumer)
        # Set once the first catch-up is done (Listener.start): live events wait for it, so a
        # restarted consumer handles its backlog before the events that came after it, in log
        # order (otherwise the first live events would overtake the backlog).
        self.resumed = asyncio.Event()
        self._atomic = _atomic_callable(consumer) if consumer.atomic and persist else None
        self._lease_executor = lease_executor
        #: set by Listener.stop(): catch-up stops before its next event
        self.stopping = False

    def owns(self, event: Event) -> bool:
        """Whether ``event`` belongs to this runner's partition (every event, unpartitioned)."""
        if self.partition is None:
            return True
        consumer = self.consumer
        return partitions.partition_of(event, consumer.partitions, consumer.key) == self.partition

    def active(self) -> bool:
        """Whether this process handles the consumer now (always, for a consumer with no lease)."""
        return self.lease is None or self.lease.valid

    # -- lease ---------------------------------------------------------------------

    async def _lease_call(self, func: Callable[..., T], *args: Any) -> T:
        # Lease statements run on a thread of their own: a slow sync handler occupies the
        # consumers' thread, and must not delay the heartbeat that keeps the lease.
        if self._lease_executor is None:
            return await sync_to_async(func)(*args)
        return await _in_thread(self._lease_executor, func, *args)

    async def acquire(self) -> bool:
        """Take the lease if it is free or expired, then load the cursor; False while another owns it."""
        assert self.lease is not None
        started = time.monotonic()
        generation = await self._lease_call(leases.acquire, self.lease.name, self.lease.owner)
        if generation is None:
            return False
        async with self.lock:
            self.lease.held(generation, started)
            # Live events wait for the catch-up from the loaded cursor, so a backlog is handled
            # before the events that came after it, in log order (same key: commit order).
            self.resumed.clear()
            try:
                await self.load()
            except BaseException:
                self.lease.lost()  # never handle from a position it did not load; it expires
                raise
        logger.info(
            "consumer %s: owned by this listener (%s) from position %s, generation %d",
            self.name,
            self.lease.owner,
            self.position,
            generation,
        )
        return True

    async def renew(self) -> None:
        """The owner's heartbeat; a failed one means the lease is gone."""
        lease = self.lease
        if lease is None or lease.generation is None:
            return
        generation, started = lease.generation, time.monotonic()
        if await self._lease_call(leases.renew, lease.name, lease.owner, generation):
            if lease.generation == generation:
                lease.held(generation, started)
        else:
            self._lost()

    async def hand_over(self) -> None:
        """Save the cursor and release the lease, for another listener to take (rebalancing)."""
        async with self.lock:
            await self.save()
            await self.release()

    async def release(self) -> None:
        lease = self.lease
        if lease is not None and lease.generation is not None:
            generation = lease.generation
            lease.lost()
            await self._lease_call(leases.release, lease.name, lease.owner, generation)

    def _lost(self) -> None:
        assert self.lease is not None
        if self.lease.generation is None:
            return
        logger.warning(
            "consumer %s: lease lost (generation %d; another listener owns it now): "
            "this listener stops handling it and stands by",
            self.name,
            self.lease.generation,
        )
        self.lease.lost()
        self._dirty = False  # never write over the new owner's cursor

    # -- cursor ------------------------------------------------------------------

    async def prepare(self) -> None:
        """Create the cursor row if the consumer is new, so that listeners can lease it."""
        if self.persist:
            await sync_to_async(_ensure_cursor)(self.name, self._start_after, self.consumer.name)

    async def load(self) -> None:
        if not self.persist:
            return
        cursor = await sync_to_async(_load_cursor)(self.name)
        handled = (cursor.handled or []) if cursor is not None else []
        # --since (start_after) applies to the first acquisition; later ones resume the cursor.
        if self._start_after is not None:
            self.position, self._start_after = self._start_after, None
            self._dirty = True
        else:
            assert cursor is not None
            self.position = cursor.position
        self.handled = dict.fromkeys(handled)

    async def save(self) -> None:
        lease = self.lease
        if lease is None or lease.generation is None or not self._dirty or self.position is None:
            return
        self._dirty = False
        generation, started = lease.generation, time.monotonic()
        saved = await sync_to_async(leases.save_cursor)(
            lease.name, lease.owner, generation, self.position, list(self.handled)
        )
        if not saved:
            self._lost()
        elif lease.generation == generation:
            lease.held(generation, started)
        self._saved_at = started

    def _advance(self, position: int | None, event_id: str | None) -> None:
        """Record a row as done: ``position`` moves to it, or (above a gap) ``event_id`` is remembered."""
        if position is not None:
            self.position = position
            if event_id is not None:
                self.handled.pop(event_id, None)
        elif event_id is not None:
            self.handled[event_id] = None

    def _state_after(self, position: int | None, event_id: str | None) -> Fence | None:
        """The fenced cursor write :meth:`_advance` will need, for an atomic consumer (else None)."""
        if self._atomic is None or self.lease is None or self.lease.generation is None:
            return None
        assert self.position is not None
        handled = dict(self.handled)
        if position is not None:
            handled.pop(event_id or "", None)
        elif event_id is not None:
            handled[event_id] = None
        moved = position if position is not None else self.position
        return (self.lease.name, self.lease.owner, self.lease.generation, moved, list(handled))

    # -- handling ------------------------------------------------------------------

    def seen(self, event_id: str) -> bool:
        return event_id in self.handled or event_id in self.recent

    async def on_live(self, event: Event) -> None:
        """Handler subscribed on the bus."""
        if not self.owns(event):
            return  # another partition's: the runner of that partition handles it
        await self.resumed.wait()
        # Shielded: stopping the subscription cancels its worker, and an event handled but
        # not yet recorded in the cursor would be handled again by the next owner.
        await asyncio.shield(self._on_live(event))

    async def _on_live(self, event: Event) -> None:
        async with self.lock:
            if not self.active() or self.seen(event.event_id):
                return  # a standby ignores live events: the owner handles them
            if self.lease is None or self.position is None:
                await self._handle(event)
                return
            log_id = await sync_to_async(_log_id)(event.event_id)
            if log_id is not None and log_id <= self.position:
                return  # handled before: a re-published event, or a late copy after catch-up
            # Usually the event is the next row of the log: then the position moves and
            # the cursor stays small. Otherwise (a gap before it) its id is remembered.
            next_row = log_id is not None and log_id == self.position + 1
            advance = (log_id if next_row else None, event.event_id)
            if not self.active():
                return
            try:
                committed = await self._handle(event, self._state_after(*advance))
            except LeaseLost:
                self._lost()
                return
            self._advance(*advance)
            self._dirty = not committed
            await self.save()  # live events: a checkpoint each (one UPDATE, fenced)

    async def _handle(self, event: Event, fence: Fence | None = None) -> bool:
        """Handle ``event`` with retries; True if an atomic consumer committed ``fence`` with it.

        Raises :class:`LeaseLost` when an atomic consumer's fenced cursor write fails (its
        handler's writes were rolled back with it).
        """
        consumer = self.consumer
        delays = backoff_delays(initial=consumer.retry_delay, maximum=30.0)
        attempts = 0
        committed = False
        while True:
            attempts += 1
            started = time.perf_counter()
            try:
                with tracing.handle_span(consumer.name, event):
                    if self._atomic is not None and fence is not None:
                        await self._atomic(event, fence)
                        committed = True
                    else:
                        await call_handler(self._func, event)
            except LeaseLost:
                raise
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
        if committed and self.lease is not None and self.lease.generation is not None:
            self._saved_at = time.monotonic()
        return committed

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
                self.name,
                self.position + 1,
                end,
            )
            self.position = end
            self.handled.clear()
            self._dirty = True
            await self.save()

    async def catch_up(self) -> int:
        """Handle what the log has after ``position`` that was not handled; returns how many."""
        try:
            return await self._catch_up()
        finally:
            self.resumed.set()  # live events go on from here, after what the log had

    async def _catch_up(self) -> int:
        if self.position is None or not self.active():
            return 0
        await self._skip_backlog()
        generation = self.lease.generation if self.lease is not None else None
        total = 0
        # The next batch is read while this one is handled: the database's time and
        # Python's overlap (catch-up is otherwise half waiting on reads).
        pending: asyncio.Future[Batch] | None = asyncio.ensure_future(self._read_batch(self.position))
        try:
            while pending is not None:
                rows, events = await pending
                pending = None
                if not rows:
                    break
                if len(rows) >= self.batch_size:
                    pending = asyncio.ensure_future(self._read_batch(rows[-1][0]))
                deadline = gap_deadline()
                async with self.lock:
                    if not self.active() or (self.lease is not None and self.lease.generation != generation):
                        break  # lost (and maybe taken again, from another position) meanwhile
                    handled, blocked = await self._catch_up_rows(rows, events, deadline)
                    total += handled
                    await self.save()
                if blocked:
                    break
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
        return total

    async def _read_batch(self, after: int) -> Batch:
        rows = await sync_to_async(_read_ids)(after, self.batch_size)
        wanted = [r[0] for r in rows if self.consumer.matches(r[2]) and not self.seen(r[1])]
        events = await sync_to_async(_read_events)(wanted, len(rows)) if wanted else {}
        if self.partition is not None:
            # Rows of other partitions count as not matching: the position passes them.
            events = {row_id: event for row_id, event in events.items() if self.owns(event)}
        return rows, events

    async def _catch_up_rows(
        self, rows: Rows, events: dict[int, Event], deadline: datetime
    ) -> tuple[int, bool]:
        """One batch of log rows (the lock held): (events handled, whether a gap stopped the position)."""
        assert self.position is not None
        consumer = self.consumer
        expected = self.position + 1
        blocked = False
        total = unsaved = 0
        # A batch shorter than a checkpoint is the head of the log: events the live path
        # lagged behind or lost a moment ago. Save after each, as the live path does, so a
        # crash repeats none of them; a longer backlog is saved every checkpoint.
        head = len(rows) < consumer.checkpoint_every
        for row_id, event_id, _topic, timestamp in rows:
            if row_id <= self.position:
                continue  # the live path moved past it while the batch was read
            if not blocked and gap_may_fill(row_id != expected, timestamp, deadline):
                blocked = True  # ids below row_id may still commit: keep position here
            expected = row_id + 1
            event = events.get(row_id)
            if event is not None and not self.seen(event_id):
                if self.stopping or not self.active():
                    break  # stopping, or the lease ran out (or was lost): not one more event
                advance = (None if blocked else row_id, event_id)
                try:
                    committed = await self._handle(event, self._state_after(*advance))
                except LeaseLost:
                    self._lost()
                    break
                self._advance(*advance)
                total += 1
                unsaved = 0 if committed else unsaved + 1
                self._dirty = not committed
            elif not blocked:
                self._advance(row_id, event_id)  # and forget it in ``handled`` (handled live)
                self._dirty = True
            if unsaved and (
                unsaved >= consumer.checkpoint_every
                or time.monotonic() - self._saved_at >= consumer.checkpoint_interval
                or head
            ):
                # A crash in catch-up handles again at most what was handled since this save.
                await self.save()
                unsaved = 0
        return total, blocked


class Listener:
    """Subscribes consumers on a bus, holds their leases and keeps them caught up with the log."""

    def __init__(
        self,
        bus: BaseEventBus,
        consumers: Iterable[Consumer],
        *,
        catch_up: bool = True,
        start_after: int | None = None,
        interval: float | None = None,
        owner: str | None = None,
    ) -> None:
        self.bus = bus
        self.catch_up_enabled = catch_up and conf.STORE_EVENTS
        self.interval = interval if interval is not None else float(conf.get("CATCHUP_INTERVAL"))
        #: this listener's name in the leases it holds: host:pid:random
        self.owner = owner or leases.new_owner()
        self._lease_executor = ThreadPoolExecutor(1, thread_name_prefix="eventbus-lease")
        self.runners: list[ConsumerRunner] = []
        #: the runners of each partitioned consumer: its listeners share the partitions
        self._groups: dict[str, list[ConsumerRunner]] = {}
        for c in consumers:
            persist = c.durable and self.catch_up_enabled
            split = persist and c.partitions > 1
            group = [
                ConsumerRunner(
                    c,
                    persist=persist,
                    start_after=start_after,
                    owner=self.owner,
                    lease_executor=self._lease_executor,
                    partition=partition,
                )
                for partition in (range(c.partitions) if split else [None])
            ]
            self.runners += group
            if split:
                self._groups[c.name] = group
        #: how many partitions of each partitioned consumer this listener may hold now
        self._shares: dict[str, int] = {}
        self._joined_at: dict[str, float] = {}
        self._subscriptions: list[Subscription] = []
        self._poller: asyncio.Task[None] | None = None
        self._leaser: asyncio.Task[None] | None = None
        self._pass: asyncio.Future[int] | None = None
        self._unregister: Callable[[], None] | None = None
        self._wake = asyncio.Event()
        self._catching_up = asyncio.Lock()

    async def start(self) -> None:
        for name in self._groups:
            await self._count_members(name, join=True)
        for runner in self.runners:
            if runner.persist:
                await runner.prepare()
                if self._may_take(runner):
                    await runner.acquire()  # else a standby: the lease loop keeps trying
            elif not (self.catch_up_enabled and runner.position is not None):
                runner.position = None
            consumer = runner.consumer
            pattern = consumer.pattern if consumer.is_pattern else None
            self._subscriptions.append(
                await self.bus.subscribe(consumer.pattern, runner.on_live, pattern=pattern)
            )
        if self.catch_up_enabled:
            self._unregister = self.bus.on_connection_restored(self._wake.set)
            await self.catch_up()
            loop = asyncio.get_running_loop()
            self._poller = loop.create_task(self._poll())
            if any(r.lease is not None for r in self.runners):
                self._leaser = loop.create_task(self._hold_leases())
        for runner in self.runners:
            runner.resumed.set()

    async def catch_up(self) -> int:
        async with self._catching_up:
            total = 0
            for runner in self.runners:
                try:
                    total += await runner.catch_up()
                except Exception:
                    logger.exception("catch-up of consumer %s failed; will retry", runner.name)
            if total:
                logger.info("caught up %d event(s) from the log", total)
            return total

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            # Shielded: stop() cancels this task, but an event being handled must be recorded
            # (stop() waits for this pass, which stops before its next event).
            self._pass = asyncio.ensure_future(self.catch_up())
            await asyncio.shield(self._pass)

    # -- partitions: a fair share each ------------------------------------------------

    async def _count_members(self, name: str, *, join: bool) -> None:
        """Renew this listener's membership (``join``), count the members, set its share."""
        runner = self._groups[name][0]
        if join:
            await runner._lease_call(leases.join, name, self.owner)
            self._joined_at[name] = time.monotonic()
        members = max(1, await runner._lease_call(leases.members, name))
        share = -(-runner.consumer.partitions // members)  # ceil: no partition left over
        cap = conf.PARTITIONS_PER_LISTENER
        self._shares[name] = share if cap is None else min(share, cap)

    def _held(self, name: str) -> list[ConsumerRunner]:
        return [r for r in self._groups[name] if r.lease is not None and r.lease.generation is not None]

    def _may_take(self, runner: ConsumerRunner) -> bool:
        """Whether this listener may take ``runner``'s lease: always, unless it is a partition
        and the listener holds its share of the consumer's partitions already."""
        if runner.partition is None:
            return True
        name = runner.consumer.name
        return len(self._held(name)) < self._shares[name]

    async def _rebalance(self) -> None:
        """Keep each partitioned consumer's share fair as listeners come and go.

        Members renew every LEASE_TTL / 3 and are counted then; a listener with standby
        partitions counts at every turn, so it takes a share as soon as another one leaves.
        Partitions above the share are handed over (cursor saved, lease released) for a
        listener that holds fewer.
        """
        for name, group in self._groups.items():
            heartbeat = time.monotonic() - self._joined_at.get(name, 0.0) >= conf.LEASE_TTL / 3
            held = self._held(name)
            if heartbeat or len(held) < len(group):
                await self._count_members(name, join=heartbeat)
            for runner in sorted(held, key=lambda r: r.partition or 0)[self._shares[name] :]:
                logger.info("consumer %s: handed over to balance the partitions", runner.name)
                await runner.hand_over()

    async def _hold_leases(self) -> None:
        """Owners renew every LEASE_TTL / 3; standbys try to take over every STANDBY_RETRY seconds."""
        leased = [r for r in self.runners if r.lease is not None]
        while True:
            await asyncio.sleep(min(STANDBY_RETRY, conf.LEASE_TTL / 3))
            try:
                await self._rebalance()
            except Exception:
                logger.exception("partitions: counting the listeners failed")
            for runner in leased:
                assert runner.lease is not None
                try:
                    if runner.lease.generation is None:
                        if self._may_take(runner) and await runner.acquire():
                            self._wake.set()  # the new owner catches up from the saved cursor now
                    elif time.monotonic() - runner.lease.renewed_at >= conf.LEASE_TTL / 3:
                        await runner.renew()
                except Exception:
                    logger.exception("lease of consumer %s: the database call failed", runner.name)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking events, let handlers finish (up to ``timeout``), save cursors, release leases."""
        if self._unregister is not None:
            self._unregister()
        for runner in self.runners:
            runner.stopping = True
        for subscription in self._subscriptions:
            await subscription.cancel()
        self._subscriptions.clear()
        for task in (self._poller, self._leaser):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        deadline = time.monotonic() + timeout
        if self._pass is not None and not self._pass.done():
            await asyncio.wait([self._pass], timeout=timeout)
        for runner in self.runners:
            try:
                await asyncio.wait_for(runner.lock.acquire(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                # Its lease is kept (it expires): a standby must not start while a handler runs.
                logger.warning("consumer %s still busy at shutdown", runner.name)
                continue
            try:
                await runner.save()
                await runner.release()  # a standby takes over at its next try
            except Exception:
                logger.exception("consumer %s: saving the cursor at shutdown failed", runner.name)
            finally:
                runner.lock.release()
        for name in self._groups:
            # The others count one member less at their next turn and take this one's share.
            with contextlib.suppress(Exception):
                await _in_thread(self._lease_executor, leases.leave, name, self.owner)
        # The ORM ran in asgiref's thread-sensitive executor and the lease thread: close
        # their connections.
        with contextlib.suppress(RuntimeError):  # at interpreter exit the executors are shut down
            await sync_to_async(connections.close_all)()
            await _in_thread(self._lease_executor, connections.close_all)
        self._lease_executor.shutdown(wait=False)


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


async def _in_thread(executor: ThreadPoolExecutor, func: Callable[..., T], *args: Any) -> T:
    return await sync_to_async(func, thread_sensitive=False, executor=executor)(*args)


def _atomic_callable(consumer: Consumer) -> Callable[[Event, Fence], Any]:
    def call(event: Event, fence: Fence) -> None:
        try:
            # The handler's writes and the fenced cursor write commit together or not at all:
            # a crash before COMMIT repeats the event with none of its writes kept, and a
            # listener that lost its lease rolls its writes back.
            with transaction.atomic(using=conf.DATABASE_ALIAS):
                consumer.func(event)
                if not leases.save_cursor(*fence):
                    raise LeaseLost(consumer.name)
        finally:
            _drop_broken_connections()

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
    """An unfenced cursor write, for the relay (which its advisory lock makes exclusive)."""
    # One UPDATE (update_or_create would lock, select and update: four round trips).
    if not ConsumerCursor.objects.filter(name=name).update(position=position, handled=handled):
        ConsumerCursor.objects.create(name=name, position=position, handled=handled)


def _ensure_cursor(name: str, start_after: int | None, consumer: str | None = None) -> None:
    # A new consumer starts at the end of the log (like a new Kafka group at "latest"): it
    # does not replay history unless asked (--since). A new partition of a consumer that ran
    # before (unpartitioned, or with another number of partitions) starts where the least
    # advanced of its old cursors stands: events may repeat across the change, none is lost.
    if ConsumerCursor.objects.filter(name=name).exists():
        return
    if start_after is None and consumer is not None and consumer != name:
        previous = ConsumerCursor.objects.filter(
            Q(name=consumer) | Q(name__startswith=f"{consumer}#")
        ).aggregate(position=Min("position"))["position"]
        start_after = previous
    leases.ensure_cursor(name, start_after if start_after is not None else _last_id())


def _log_id(event_id: str) -> int | None:
    return StoredEvent.objects.filter(event_id=event_id).values_list("id", flat=True).first()


def _read_ids(after: int, limit: int) -> list[tuple[int, str, str, datetime]]:
    return list(
        StoredEvent.objects.filter(id__gt=after)
        .order_by("id")
        .values_list("id", "event_id", "topic", "timestamp")[:limit]
    )


def _read_events(ids: list[int], span: int | None = None) -> dict[int, Event]:
    """The events of log rows ``ids`` (ascending), out of ``span`` rows read by id.

    values_list, not model instances: catch-up reads many rows and only needs the
    events. When most of the span is wanted, one range scan beats an ``IN`` list of
    thousands of ids; the few other rows are read and dropped.
    """
    events = StoredEvent.objects.values_list(*EVENT_COLUMNS)
    if span is not None and ids and 2 * len(ids) >= span:
        wanted = set(ids)
        rows = events.filter(id__gte=ids[0], id__lte=ids[-1])
        return {row[0]: event_from_row(row) for row in rows if row[0] in wanted}
    return {row[0]: event_from_row(row) for row in events.filter(id__in=ids)}


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
