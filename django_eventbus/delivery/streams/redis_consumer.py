"""Running ``@consumer`` functions on Redis Streams, as members of a consumer group.

Each registered consumer is one consumer group (named after the consumer) on the
streams of the topics it matches (``<prefix>:topics``, every partition). A
process is one member of each group (``host:pid``). Redis consumer groups share
entries among members but do not keep per-key order across them, so a member
reads only the streams (partitions) it *owns*:

* Ownership is a lease: ``<prefix>:owner:<group>:<stream>`` set with ``NX`` and
  ``claim_idle`` seconds to live, renewed every third of that (every second at
  most, when the member also looks for the streams of new topics). Live members
  (``<prefix>:members:<group>``, a sorted set of heartbeats) share the streams
  evenly: a member with more than its share releases the extra streams between
  entries (with nothing of them in hand), one with less takes free ones.
* A member that dies stops renewing; after ``claim_idle`` seconds another takes
  its streams and first ``XAUTOCLAIM``\\ s the entries pending on it (idle at least
  ``claim_idle``), in id order, before reading new ones (``XREADGROUP … >``). So
  a key's events are handled in log order; entries the dead member had handled
  but not acknowledged are handled again (the only duplicates: at most ``count``
  per stream it owned).
* ``XACK`` follows the handlers: one per pass over the entries in hand (at most
  ``count``, the entries of one read). A failed entry stays pending and blocks its own
  stream (order) but not the others; it is retried after a backoff by
  ``XCLAIM`` to the same member, which counts the delivery in Redis, so a handler
  that crashes its process is counted too. When an entry has been delivered
  ``retries + 1`` times (the consumer's ``retries``) and fails again, it goes to
  the dead-letter stream ``<prefix>:dead:<group>`` and is acknowledged in one
  ``MULTI``; the stream moves on.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import os
import socket
import time
import traceback
import zlib
from typing import Any

from django_eventbus import signals, tracing
from django_eventbus.delivery.consumers import Consumer
from django_eventbus.delivery.listener import _callable
from django_eventbus.events.codec import loads_event
from django_eventbus.events.dispatch import call_handler

from . import StreamTarget

__all__ = ["StreamGroupConsumer", "default_member_name"]

logger = logging.getLogger("django_eventbus")

# Compare-and-renew and compare-and-delete of a lease: only its holder may do either.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then"
    " return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def default_member_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass
class _Owned:
    """A stream this member owns: entries in hand (id, fields, deliveries), in id order."""

    queue: collections.deque[tuple[str, dict[str, str], int]] = dataclasses.field(
        default_factory=collections.deque
    )
    #: entries of earlier owners may still be pending: claim them before reading new ones
    claiming: bool = True
    #: monotonic time before which the entry at the head is not retried
    retry_at: float = 0.0


class StreamGroupConsumer:
    """One consumer as a member of its group on the streams it matches; see the module docstring."""

    def __init__(
        self,
        client: Any,
        target: StreamTarget,
        consumer: Consumer,
        *,
        member: str | None = None,
        claim_idle: float = 30.0,
        count: int = 10,
    ) -> None:
        self.client = client
        self.target = target
        self.consumer = consumer
        self.group = consumer.name
        self.member = member or default_member_name()
        self.claim_idle = claim_idle
        #: entries read per stream at a time: the in-flight bound
        self.count = count
        self.owned: dict[str, _Owned] = {}
        self.handled = 0
        self.dead_lettered = 0
        self._func = _callable(consumer)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        prefix = target.prefix
        self._members_key = f"{prefix}:members:{self.group}"
        self._dead_key = f"{prefix}:dead:{self.group}"

    def _owner_key(self, stream: str) -> str:
        return f"{self.target.prefix}:owner:{self.group}:{stream}"

    # -- the loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then hand the streams back (finishing the entry in hand)."""
        next_tick = 0.0
        try:
            while not stop.is_set():
                for stream, owned in list(self.owned.items()):
                    if owned.claiming:
                        await self._claim(stream, owned)
                    await self._work(stream, owned, stop)
                # After the work: the streams in hand are empty now, so extras can be handed back.
                if time.monotonic() >= next_tick:
                    await self._tick()
                    # Renew leases every third of their life, and look for new topics' streams
                    # at least every second (a tick is a handful of commands).
                    next_tick = time.monotonic() + min(self.claim_idle / 3, 1.0)
                await self._read(max(0.001, min(next_tick, self._next_retry()) - time.monotonic()))
        finally:
            await self._leave()

    def _next_retry(self) -> float:
        waiting = [o.retry_at for o in self.owned.values() if o.queue]
        return min(waiting, default=math.inf)

    async def _read(self, wait: float) -> None:
        ready = {s: ">" for s, o in self.owned.items() if not o.queue and not o.claiming}
        if not ready:
            await asyncio.sleep(min(wait, 0.05))
            return
        block = max(1, min(int(wait * 1000), 500))
        reply = await self.client.xreadgroup(self.group, self.member, ready, count=self.count, block=block)
        for stream, entries in reply or []:
            queue = self.owned[stream].queue
            queue.extend((entry_id, fields, 1) for entry_id, fields in entries)

    # -- ownership --------------------------------------------------------------------

    async def _streams(self) -> list[str]:
        prefix = self.target.prefix
        topics, written = await asyncio.gather(
            self.client.smembers(f"{prefix}:topics"), self.client.get(f"{prefix}:partitions")
        )
        partitions = int(written) if written else self.target.partitions
        matching = sorted(t for t in topics if self.consumer.matches(t))
        return [self.target.stream(t, p) for t in matching for p in range(partitions)]

    async def _tick(self) -> None:
        seconds, micros = await self.client.time()
        now = seconds + micros / 1e6
        lease = int(self.claim_idle * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self._members_key, {self.member: now})
        pipe.zremrangebyscore(self._members_key, "-inf", now - self.claim_idle)
        pipe.zcard(self._members_key)
        alive = (await pipe.execute())[2]
        for stream in list(self.owned):
            if not await self._renew(keys=[self._owner_key(stream)], args=[self.member, lease]):
                logger.warning("consumer %s lost its lease on %s; another member has it", self.group, stream)
                del self.owned[stream]
        streams = await self._streams()
        share = math.ceil(len(streams) / max(1, alive))
        if len(self.owned) > share:
            for stream in sorted(self.owned, reverse=True)[: len(self.owned) - share]:
                if not self.owned[stream].queue:  # hand back only what is fully acknowledged
                    await self._release(keys=[self._owner_key(stream)], args=[self.member])
                    del self.owned[stream]
            return
        # Start the search at a place that depends on the member, so members do not all race
        # for the same free streams.
        start = zlib.crc32(self.member.encode()) % max(1, len(streams))
        for stream in streams[start:] + streams[:start]:
            if len(self.owned) >= share:
                break
            if stream not in self.owned and await self.client.set(
                self._owner_key(stream), self.member, nx=True, px=lease
            ):
                await self._join(stream)

    async def _join(self, stream: str) -> None:
        try:
            await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
        except Exception as exc:  # redis.ResponseError, BUSYGROUP: the group exists already
            if "BUSYGROUP" not in str(exc):
                raise
        self.owned[stream] = _Owned()

    async def _claim(self, stream: str, owned: _Owned) -> None:
        """Take over the entries earlier owners left pending, in id order."""
        min_idle = int(self.claim_idle * 1000)
        start = "0-0"
        claimed: list[tuple[str, dict[str, str]]] = []
        while True:
            reply = await self.client.xautoclaim(
                stream, self.group, self.member, min_idle, start_id=start, count=100
            )
            start, entries = reply[0], reply[1]
            claimed.extend((i, f) for i, f in entries if f is not None)
            if start == "0-0":
                break
        counts: dict[str, int] = {}
        if claimed:
            details = await self.client.xpending_range(
                stream, self.group, claimed[0][0], claimed[-1][0], len(claimed), consumername=self.member
            )
            counts = {d["message_id"]: int(d["times_delivered"]) for d in details}
            logger.info("consumer %s took over %d pending entries of %s", self.group, len(claimed), stream)
        owned.queue.extend((i, f, counts.get(i, 1)) for i, f in claimed)
        summary = await self.client.xpending(stream, self.group)
        # Entries pending on others not idle long enough yet: claim again before reading new ones.
        owned.claiming = int(summary["pending"]) > len(owned.queue)

    async def _leave(self) -> None:
        for stream in list(self.owned):
            await self._release(keys=[self._owner_key(stream)], args=[self.member])
        self.owned.clear()
        await self.client.zrem(self._members_key, self.member)

    # -- handling ---------------------------------------------------------------------

    async def _work(self, stream: str, owned: _Owned, stop: asyncio.Event) -> None:
        handled: list[str] = []
        try:
            while owned.queue and not stop.is_set() and time.monotonic() >= owned.retry_at:
                entry_id, fields, deliveries = owned.queue[0]
                if owned.retry_at:  # a retry: count the delivery in Redis before running it again
                    reply = await self.client.xclaim(stream, self.group, self.member, 0, [entry_id])
                    if not reply or reply[0][1] is None:
                        owned.queue.popleft()  # trimmed away meanwhile
                        owned.retry_at = 0.0
                        continue
                    deliveries += 1
                    owned.queue[0] = (entry_id, fields, deliveries)
                owned.retry_at = 0.0
                error = await self._handle(fields, deliveries)
                if error is None:
                    handled.append(entry_id)
                elif deliveries > self.consumer.retries or isinstance(error, _Undecodable):
                    await self._dead_letter(stream, entry_id, fields, deliveries, error)
                else:
                    delay = min(30.0, self.consumer.retry_delay * 2 ** (deliveries - 1))
                    owned.retry_at = time.monotonic() + delay
                    return
                owned.queue.popleft()
        finally:
            if handled:
                # One XACK for what this pass handled (at most --count entries of a read): a
                # crash repeats at most those, and a round trip per entry would cost more than
                # a cheap handler (bench/README.md).
                await self.client.xack(stream, self.group, *handled)

    async def _handle(self, fields: dict[str, str], deliveries: int) -> BaseException | None:
        name = self.consumer.name
        try:
            event = loads_event(fields.get("event", ""))
        except ValueError as exc:
            logger.error("consumer %s: an entry is not an event (%s)", name, exc)
            return _Undecodable(str(exc))
        started = time.perf_counter()
        try:
            with tracing.handle_span(name, event):
                await call_handler(self._func, event)
        except Exception as exc:
            last = deliveries > self.consumer.retries
            logger.warning(
                "consumer %s failed on event %s (%s), delivery %d of %d",
                name,
                event.event_id,
                event.topic,
                deliveries,
                self.consumer.retries + 1,
                exc_info=True,
            )
            signals.failed(name, event, exc, deliveries, dead_lettered=last)
            return exc
        self.handled += 1
        signals.handled(name, event, time.perf_counter() - started)
        return None

    async def _dead_letter(
        self, stream: str, entry_id: str, fields: dict[str, str], deliveries: int, error: BaseException
    ) -> None:
        logger.error(
            "consumer %s gave up on entry %s of %s after %d deliveries: dead-lettered to %s",
            self.group,
            entry_id,
            stream,
            deliveries,
            self._dead_key,
        )
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))[-10_000:]
        pipe = self.client.pipeline(transaction=True)  # both or neither
        pipe.xadd(
            self._dead_key,
            {
                "event": fields.get("event", ""),
                "stream": stream,
                "id": entry_id,
                "deliveries": str(deliveries),
                "error": text,
            },
            maxlen=self.target.maxlen or None,
            approximate=True,
        )
        pipe.xack(stream, self.group, entry_id)
        await pipe.execute()
        self.dead_lettered += 1


class _Undecodable(ValueError):
    """An entry that is no event: retrying cannot help, so it is dead-lettered at once."""
