"""Partitions: a stable hash of an event's key picks one of N partitions.

A consumer declared with ``partitions=N`` is N leased consumers in one: partition
``i`` handles the events whose key hashes to ``i``, with its own cursor and lease,
so up to N listener processes share the work, and the events of one key are
handled in commit order by one of them. The stream relay partitions its streams
with the same hash (:mod:`django_eventbus.delivery.streams`).

The hash is CRC-32 of the key's compact JSON text, so another language computes the
same partition: ``zlib.crc32(json.dumps(key, separators=(",", ":")).encode()) % partitions``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

from django_eventbus.events.codec import dumps
from django_eventbus.events.types import Event

__all__ = ["cursor_name", "partition_of", "row_key"]

#: ``event -> key``: events with equal keys go to the same partition
KeyFunc = Callable[[Event], Any]


def row_key(event: Event) -> Any:
    """A consumer's default key: the row (topic and pk) for model events, else the topic."""
    payload = event.payload
    if isinstance(payload, Mapping) and "pk" in payload:
        return [event.topic, payload["pk"]]
    return event.topic


def partition_of(event: Event, partitions: int, key: KeyFunc | None = None) -> int:
    """The partition of ``event`` among ``partitions``: CRC-32 of ``key(event)``'s JSON text."""
    value = (key or row_key)(event)
    return zlib.crc32(dumps(value).encode()) % partitions


def cursor_name(consumer: str, partition: int, partitions: int) -> str:
    """The cursor (and lease) of one partition of a consumer: ``"name#2/4"``."""
    return f"{consumer}#{partition}/{partitions}"
