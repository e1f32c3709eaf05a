"""The Redis Streams sink of the stream relay: pipelined ``XADD`` with the log id as entry id.

Exactly once per event, by a deterministic entry id: the entry of log row ``n``
is ``n-0``. Redis refuses an ``XADD`` whose id is not above the stream's last id
(and remembers that id after trimming, even when the stream is empty), so when
a relay resumes after a crash between its ``XADD``\\ s and its cursor save, the
batch it sends again is refused entry by entry and counted as skipped. No dedup
keys, no TTL that could expire before a late retry, one round trip per batch —
and the entry id tells any reader which log row it is. (A ``SET NX`` of the event
id inside a ``MULTI`` would cost a key per event and a TTL to pick.) The same
refusal keeps log order per stream: ids only grow.

Retention: ``XADD … MAXLEN ~ maxlen`` (0 keeps everything). Because entry ids are
log ids, ``XTRIM <stream> MINID <log id>`` trims a stream to what the log keeps.

Beside the streams the sink keeps two keys: ``<prefix>:topics`` (a set of the
topics relayed, which consumers read to find their streams) and
``<prefix>:partitions`` (the number of partitions the streams were written with;
a relay with another number refuses to start: it would move keys to other
streams and break per-key order).
"""

from __future__ import annotations

import logging
from typing import Any

from django_eventbus.events.codec import dumps_event
from django_eventbus.events.types import Event

from . import StreamTarget, partition_of

__all__ = ["RedisStreamSink", "redis_client"]

logger = logging.getLogger("django_eventbus")

#: the start of Redis's error for an XADD id at or below the stream's last id
_ID_TOO_SMALL = "The ID specified in XADD is equal or smaller"


def redis_client(target: StreamTarget) -> Any:
    """A redis.asyncio client for a target (redis-py, the ``[redis]`` extra)."""
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:  # pragma: no cover - the dev install has it
        raise ImportError("Redis Streams need redis-py: pip install 'django-eventbus[redis]'") from exc
    return aioredis.Redis.from_url(target.url, decode_responses=True)


class RedisStreamSink:
    """Appends events to ``<prefix>:<topic>:<partition>`` streams; see the module docstring."""

    def __init__(self, target: StreamTarget) -> None:
        self.target = target
        self.client: Any = None
        self._topics: set[str] = set()

    async def connect(self) -> None:
        self.client = redis_client(self.target)
        key = f"{self.target.prefix}:partitions"
        await self.client.set(key, self.target.partitions, nx=True)
        written = int(await self.client.get(key))
        if written != self.target.partitions:
            raise ValueError(
                f"the streams under prefix {self.target.prefix!r} were written with {written} partitions, "
                f"not {self.target.partitions}: use partitions={written} or a new prefix"
            )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def append(self, rows: list[tuple[int, Event]]) -> int:
        target = self.target
        pipe = self.client.pipeline(transaction=False)
        new_topics = {event.topic for _, event in rows} - self._topics
        if new_topics:
            pipe.sadd(f"{target.prefix}:topics", *sorted(new_topics))
        maxlen = target.maxlen or None
        for log_id, event in rows:
            stream = target.stream(event.topic, partition_of(event, target.partitions))
            entry = {"event": dumps_event(event)}
            pipe.xadd(stream, entry, id=f"{log_id}-0", maxlen=maxlen, approximate=True)
        results = await pipe.execute(raise_on_error=False)
        skipped = 0
        for result in results:
            if isinstance(result, Exception):
                if _ID_TOO_SMALL not in str(result):
                    raise result
                skipped += 1
        if skipped:
            logger.info("stream relay: %d entries were in the streams already (a resumed batch)", skipped)
        self._topics |= new_topics
        return skipped
