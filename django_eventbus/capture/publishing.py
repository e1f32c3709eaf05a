"""``publish``/``apublish``: custom events from Django code, recorded and published on commit."""

from __future__ import annotations

import dataclasses
from typing import Any

from asgiref.sync import sync_to_async

from django_eventbus import tracing
from django_eventbus.conf import conf
from django_eventbus.events import Event, EventType
from django_eventbus.events.codec import check_event

from .context import current_correlation_id
from .outbox import emit

__all__ = ["apublish", "make_event", "publish"]


def make_event(
    topic: str, event_type: EventType | str = EventType.CUSTOM, payload: Any = None, **kw: Any
) -> Event:
    """An event with this process's ``source`` and the current correlation id filled in."""
    kw.setdefault("source", conf.SOURCE)
    kw.setdefault("correlation_id", current_correlation_id())
    kw["metadata"] = tracing.inject(kw.get("metadata") or {})
    return Event(type=EventType(event_type), topic=topic, payload=payload or {}, **kw)


def _complete(topic: str, event: Event) -> Event:
    if event.topic != topic:
        raise ValueError(f"publish({topic!r}, event) with event.topic={event.topic!r}: they must be equal")
    check_event(event)  # fail in the caller, not after commit
    metadata = tracing.inject(event.metadata)
    if event.source is None or event.correlation_id is None or metadata is not event.metadata:
        event = dataclasses.replace(
            event,
            source=event.source or conf.SOURCE,
            correlation_id=event.correlation_id or current_correlation_id(),
            metadata=metadata,
        )
    return event


def publish(topic: str, event: Event, *, using: str | None = None) -> Event:
    """Record ``event`` and publish it when the current transaction commits (now, in autocommit).

    Same signature as ``EventBus.publish``; returns the event as recorded (with
    ``source`` and ``correlation_id`` filled in when they were empty).
    """
    event = _complete(topic, event)
    emit([event], using)
    return event


async def apublish(topic: str, event: Event, *, using: str | None = None) -> Event:
    """Async ``publish``: the database work runs in Django's sync thread, like the ORM's a-methods."""
    event = _complete(topic, event)
    await sync_to_async(emit)([event], using)
    return event
