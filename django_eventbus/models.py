"""The event log: every event, in commit order, the source of truth for catch-up."""

from __future__ import annotations

from typing import Any

from django.db import models

from .events import Event, EventType

__all__ = ["StoredEvent"]


class StoredEvent(models.Model):
    """One published event. ``id`` increases with insertion; ``event_id`` is the event's own id."""

    id = models.BigAutoField(primary_key=True)
    event_id = models.CharField(max_length=64, unique=True)
    type = models.CharField(max_length=16, choices=[(t.value, t.name.title()) for t in EventType])
    topic = models.CharField(max_length=1024)
    payload = models.JSONField(default=dict)
    timestamp = models.DateTimeField()
    source = models.CharField(max_length=255, blank=True, null=True)
    correlation_id = models.CharField(max_length=255, blank=True, null=True)
    metadata = models.JSONField(default=dict)

    class Meta:
        db_table = "django_eventbus_event"
        ordering = ["-id"]
        verbose_name = "event"
        verbose_name_plural = "events"
        indexes = [
            models.Index(fields=["topic", "id"], name="eventbus_topic_id"),
            models.Index(fields=["timestamp"], name="eventbus_timestamp"),
            models.Index(fields=["correlation_id"], name="eventbus_correlation"),
            models.Index(fields=["source", "id"], name="eventbus_source_id"),
            models.Index(fields=["type", "id"], name="eventbus_type_id"),
        ]
        permissions = [("republish_storedevent", "Can re-publish events")]

    def __str__(self) -> str:
        return f"{self.type} {self.topic} {self.event_id}"

    def to_event(self) -> Event:
        return Event(
            type=EventType(self.type),
            topic=self.topic,
            payload=self.payload or {},
            timestamp=self.timestamp,
            event_id=self.event_id,
            source=self.source,
            correlation_id=self.correlation_id,
            metadata=self.metadata or {},
        )

    @classmethod
    def from_event(cls, event: Event, **kwargs: Any) -> StoredEvent:
        return cls(
            event_id=event.event_id,
            type=event.type.value,
            topic=event.topic,
            payload=dict(event.payload),
            timestamp=event.timestamp,
            source=event.source,
            correlation_id=event.correlation_id,
            metadata=dict(event.metadata),
            **kwargs,
        )
