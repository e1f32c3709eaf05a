"""Local dispatch shared by every backend: which subscriptions match a topic, and delivery.

A transport (memory, PostgreSQL, Redis) only moves events between processes;
once an event is in this process, this module decides who gets it. So topic
matching, the "exact and pattern overlap → still once" rule, error isolation
and the bounded per-subscription queues exist once, not once per backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import time

from .topics import topic_matches
from .types import Event, Handler, Subscription

__all__ = ["BusStats", "Delivery", "SubscriptionTable", "call_handler", "topic_matches"]

logger = logging.getLogger("django_eventbus.events")


@dataclasses.dataclass
class BusStats:
    """Counters of one bus in this process (read them to export metrics)."""

    published: int = 0
    delivered: int = 0
    dropped: int = 0
    handler_errors: int = 0
    invalid_messages: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


async def call_handler(handler: Handler, event: Event) -> None:
    """Call a sync or async handler and await what it returns, if anything."""
    result = handler(event)
    if inspect.isawaitable(result):
        await result


class Delivery:
    """One subscription's handler, with its own bounded queue when ``queue_size`` is set.

    Without a queue (the memory backend) :meth:`deliver` runs the handler inline.
    With one, :meth:`offer` never waits: a worker task drains the queue, so a slow
    handler delays only its own subscription. When the queue is full the *new*
    event is dropped for this subscription only, logged with its id and counted
    in ``stats.dropped`` (the Django layer's catch-up from the event log recovers it).
    """

    def __init__(
        self, subscription: Subscription, handler: Handler, stats: BusStats, queue_size: int | None = None
    ) -> None:
        self.subscription = subscription
        self.handler = handler
        self.stats = stats
        self._queue: asyncio.Queue[Event] | None = asyncio.Queue(queue_size) if queue_size else None
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False
        self._dropped = 0
        self._warned_at = -1.0

    def matches(self, topic: str) -> bool:
        sub = self.subscription
        return topic_matches(sub.pattern, topic) if sub.pattern is not None else topic == sub.topic

    async def deliver(self, event: Event) -> None:
        """Run the handler now; a failure is logged with the event id, never raised."""
        if not self.subscription.active:
            return
        try:
            await call_handler(self.handler, event)
        except Exception:
            self.stats.handler_errors += 1
            logger.exception(
                "event bus handler %r failed for event %s on topic %r",
                getattr(self.handler, "__qualname__", self.handler),
                event.event_id,
                event.topic,
            )
        else:
            self.stats.delivered += 1

    def offer(self, event: Event) -> None:
        """Queue the event for the worker (must be called on the bus's event loop)."""
        assert self._queue is not None, "offer() needs a queue_size"
        if self._stopping:
            return
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            self._dropped += 1
            now = time.monotonic()
            # One warning a second at most: a burst would otherwise log thousands of lines
            # from the transport's reader, slowing down the very thing that overflowed.
            if now - self._warned_at >= 1.0:
                self._warned_at = now
                logger.warning(
                    "event bus queue of subscription %s (%s) is full (%d): dropped event %s "
                    "(%d dropped by this subscription so far)",
                    self.subscription.subscription_id,
                    self.subscription.pattern or self.subscription.topic,
                    self._queue.maxsize,
                    event.event_id,
                    self._dropped,
                )

    async def _work(self) -> None:
        assert self._queue is not None
        while not self._stopping:
            event = await self._queue.get()
            await self.deliver(event)
            self._queue.task_done()

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) until queued events were handled."""
        if self._queue is not None and self._worker is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout)
            except asyncio.TimeoutError:
                logger.warning(
                    "subscription %s: %d events not handled before shutdown",
                    self.subscription.subscription_id,
                    self._queue.qsize(),
                )

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        self._stopping = True
        # One cancel() is not enough on Python 3.11: a handler inside asyncio.wait_for
        # can swallow a cancellation that arrives as its inner future completes, and
        # the worker would then wait in queue.get() for ever. Cancel until it is done.
        while not worker.done():
            worker.cancel()
            await asyncio.wait({worker}, timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            worker.result()


class SubscriptionTable:
    """Exact topics in a dict, patterns in a list; lookups cached per topic.

    Each subscription appears in the result at most once, so an event reaches a
    subscription once even when its topic is also matched by a pattern that
    another subscription (or the transport, e.g. Redis PSUBSCRIBE) uses.
    """

    def __init__(self) -> None:
        self._exact: dict[str, list[Delivery]] = {}
        self._patterns: list[Delivery] = []
        self._cache: dict[str, tuple[Delivery, ...]] = {}

    def add(self, delivery: Delivery) -> None:
        sub = delivery.subscription
        if sub.pattern is not None:
            self._patterns.append(delivery)
        else:
            self._exact.setdefault(sub.topic, []).append(delivery)
        self._cache.clear()

    def remove(self, delivery: Delivery) -> None:
        sub = delivery.subscription
        if sub.pattern is not None:
            if delivery in self._patterns:
                self._patterns.remove(delivery)
        else:
            entries = self._exact.get(sub.topic, [])
            if delivery in entries:
                entries.remove(delivery)
            if not entries:
                self._exact.pop(sub.topic, None)
        self._cache.clear()

    def match(self, topic: str) -> tuple[Delivery, ...]:
        found = self._cache.get(topic)
        if found is None:
            found = tuple(self._exact.get(topic, ())) + tuple(d for d in self._patterns if d.matches(topic))
            if len(self._cache) > 4096:  # topics are often unbounded (ids in them): keep the cache bounded
                self._cache.clear()
            self._cache[topic] = found
        return found

    def exact_topics(self) -> set[str]:
        return set(self._exact)

    def patterns(self) -> set[str]:
        return {d.subscription.pattern for d in self._patterns if d.subscription.pattern is not None}

    def all(self) -> list[Delivery]:
        return [d for entries in self._exact.values() for d in entries] + list(self._patterns)

    def has_topic(self, topic: str) -> bool:
        return topic in self._exact

    def has_pattern(self, pattern: str) -> bool:
        return any(d.subscription.pattern == pattern for d in self._patterns)

    def __len__(self) -> int:
        return sum(len(v) for v in self._exact.values()) + len(self._patterns)
