"""Relaying the whole event log to a stream engine, and consuming it there (docs/streams.md).

The log stays the transactional outbox; a stream engine (Redis Streams today)
takes over the read side: partitions, retention, consumer groups. Pieces:

* :class:`StreamTarget` — where the streams live, from a URL such as
  ``redis-streams://host:6379/0?partitions=4&maxlen=100000&prefix=eventbus``.
* :func:`partition_of` — the stable partition of an event: CRC-32 of the JSON
  text of its key (the payload's ``pk``, else the event id) modulo the number of
  partitions, so every event of one model row lands in one stream, in log order,
  and a producer in another language can compute the same partition.
* :class:`StreamRelay` — a :class:`~django_eventbus.delivery.relay.LogRelay` over *every*
  log row (not only the relay rows), under an advisory lock of its own per
  target, with its cursor ``"django_eventbus.streams:<target>"``; it hands each
  batch to a sink (:class:`~django_eventbus.delivery.streams.redis_streams.RedisStreamSink`).

Stream names are ``<prefix>:<topic>:<partition>``; the one wire format of the
project (:func:`~django_eventbus.events.codec.dumps_event`) is the ``event``
field of each entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from django_eventbus.delivery import partitions as partitions_module
from django_eventbus.delivery.relay import LogRelay
from django_eventbus.events.types import Event

__all__ = ["StreamRelay", "StreamSink", "StreamTarget", "parse_target", "partition_of"]

#: URL schemes of stream targets -> the redis-py URL scheme they stand for
_REDIS_SCHEMES = {"redis-streams": "redis", "rediss-streams": "rediss"}


@dataclasses.dataclass(frozen=True)
class StreamTarget:
    """A parsed stream target URL."""

    engine: str
    #: the engine's own connection URL (``redis://…``), query removed
    url: str
    partitions: int = 4
    #: ``MAXLEN ~`` retention per stream (entries); 0 keeps everything
    maxlen: int = 100_000
    prefix: str = "eventbus"

    @property
    def name(self) -> str:
        """The identity of the target (no password, no tuning options): it keys the relay's cursor."""
        parts = urlsplit(self.url)
        host = parts.hostname or "127.0.0.1"
        port = f":{parts.port}" if parts.port else ""
        return f"{self.engine}://{host}{port}{parts.path or '/0'}?prefix={self.prefix}"

    @property
    def cursor_name(self) -> str:
        return f"django_eventbus.streams:{self.name}"

    def stream(self, topic: str, partition: int) -> str:
        return f"{self.prefix}:{topic}:{partition}"


def parse_target(url: str) -> StreamTarget:
    """``redis-streams://[user:password@]host:port/db?partitions=N&maxlen=N&prefix=P`` -> a target."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _REDIS_SCHEMES:
        raise ValueError(
            f"unknown stream target scheme {scheme!r}: use redis-streams:// or rediss-streams:// "
            "(NATS JetStream and Kafka are not built yet, see docs/streams.md)"
        )
    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query):
        if key in ("partitions", "maxlen"):
            try:
                options[key] = int(value)
            except ValueError:
                raise ValueError(f"stream target option {key}={value!r} is not an integer") from None
        elif key == "prefix":
            options[key] = value
        else:
            raise ValueError(f"unknown stream target option {key!r} (partitions, maxlen, prefix)")
    if options.get("partitions", 1) < 1 or options.get("maxlen", 0) < 0:
        raise ValueError("stream target: partitions must be >= 1 and maxlen >= 0")
    if not options.get("prefix", "eventbus"):
        raise ValueError("stream target: prefix must not be empty")
    engine_url = urlunsplit(parts._replace(scheme=_REDIS_SCHEMES[scheme], query=""))
    return StreamTarget(engine="redis-streams", url=engine_url, **options)


def stream_key(event: Event) -> Any:
    """A stream's partition key: the payload's ``pk`` (a row's events in one stream), else the event id."""
    payload = event.payload
    return payload["pk"] if isinstance(payload, Mapping) and "pk" in payload else event.event_id


def partition_of(event: Event, partitions: int) -> int:
    """The stream partition of an event: CRC-32 of :func:`stream_key`'s JSON text, modulo ``partitions``."""
    return partitions_module.partition_of(event, partitions, key=stream_key)


class StreamSink(Protocol):
    """Where a :class:`StreamRelay` appends events: exactly once per log id, in log order."""

    target: StreamTarget

    async def connect(self) -> None: ...

    async def append(self, rows: list[tuple[int, Event]]) -> int:
        """Append ``(log id, event)`` pairs; returns how many were already there (skipped)."""
        ...

    async def close(self) -> None: ...


class StreamRelay(LogRelay):
    """Relays every log row to a stream sink, in log order; one active per target and database."""

    relay_only = False
    application_name = "django_eventbus:stream-relay"

    def __init__(self, sink: StreamSink, **options: Any) -> None:
        options.setdefault("name", sink.target.cursor_name)
        options.setdefault("batch_size", 5000)
        super().__init__(**options)
        self.sink = sink
        # One advisory lock per target (the bus relay and relays to other targets run beside it).
        digest = hashlib.blake2b(self.name.encode(), digest_size=8).digest()
        self.lock_key = int.from_bytes(digest, "big", signed=True)
        #: entries a resumed relay found already appended (a crash between append and cursor save)
        self.skipped = 0

    async def deliver(self, rows: list[tuple[int, Event]]) -> None:
        self.skipped += await self.sink.append(rows)
