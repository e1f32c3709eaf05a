"""The event log: every event, in commit order, the source of truth for catch-up."""

from __future__ import annotations

from typing import Any

from django.db import models

from .events import Event, EventType

__all__ = ["StoredEvent"]


class StoredEvent(models.Model):
    """One published event. ``id`` increases with insertion; ``event_id`` is the event's own id."""

    id = models.BigAutoField(primary_key=True)
    # Unique through Meta.constraints, not unique=True: on PostgreSQL the field option
    # adds a second, varchar_pattern_ops copy of the index that nothing here uses.
    event_id = models.CharField(max_length=64)
    type = models.CharField(max_length=16, choices=[(t.value, t.name.title()) for t in EventType])
    topic = models.CharField(max_length=1024)
    payload = models.JSONField(default=dict)
    timestamp = models.DateTimeField()
    source = models.CharField(max_length=255, blank=True, null=True)
    correlation_id = models.CharField(max_length=255, blank=True, null=True)
    metadata = models.JSONField(default=dict)
    #: True for rows whose writer did not publish them (database capture, a transaction
    #: over the outbox's publish limit): the listener's relay publishes them from the log.
    relay = models.BooleanField(default=False, db_default=False)

    class Meta:
        db_table = "django_eventbus_event"
        ordering = ["-id"]
        verbose_name = "event"
        verbose_name_plural = "events"
        indexes = [
            # varchar_pattern_ops: also serves the admin's topic-prefix LIKE under a non-C
            # collation (other databases ignore opclasses).
            models.Index(
                fields=["topic", "id"],
                name="eventbus_topic_id",
                opclasses=["varchar_pattern_ops", "int8_ops"],
            ),
            models.Index(fields=["timestamp"], name="eventbus_timestamp"),
            models.Index(fields=["correlation_id"], name="eventbus_correlation"),
            models.Index(fields=["source", "id"], name="eventbus_source_id"),
            # Only the rows left to the relay (no writer published them): what the relay scans.
            models.Index(fields=["id"], name="eventbus_relay", condition=models.Q(relay=True)),
        ]
        constraints = [models.UniqueConstraint(fields=["event_id"], name="eventbus_event_id_unique")]
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


class ConsumerCursor(models.Model):
    """How far a durable consumer got in the log.

    Every log row with ``id <= position`` was handled (or did not match). Events
    handled above it (live, before catch-up reached them) are in ``handled``, so
    a restart never handles them twice. The lease fields say which listener
    process owns the consumer (one at a time; see :mod:`django_eventbus.delivery.leases`).
    """

    name = models.CharField(max_length=255, primary_key=True)
    position = models.BigIntegerField(default=0)
    handled = models.JSONField(default=list, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    # The lease (django_eventbus.delivery.leases): which listener process runs this consumer.
    #: "host:pid:random" of the owning listener; "" when nobody holds the lease.
    owner = models.CharField(max_length=255, blank=True, default="", db_default="")
    #: +1 per acquisition; every cursor write names it, so a former owner's write fails.
    generation = models.BigIntegerField(default=0, db_default=0)
    owner_since = models.DateTimeField(null=True, blank=True)
    #: the database clock's time after which another listener may take the lease
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "django_eventbus_cursor"
        verbose_name = "consumer cursor"

    def __str__(self) -> str:
        return f"{self.name} @ {self.position}"


class ConsumerMember(models.Model):
    """A listener process running a partitioned consumer, while its heartbeat lasts.

    Listeners count the live members of a consumer to take a fair share of its
    partitions (``ceil(partitions / members)``) and hand over the rest.
    """

    consumer = models.CharField(max_length=255)
    #: the listener's "host:pid:random", as in the leases it holds
    owner = models.CharField(max_length=255)
    #: the database clock's time after which the member counts as gone
    expires_at = models.DateTimeField()

    class Meta:
        db_table = "django_eventbus_member"
        verbose_name = "consumer member"
        constraints = [models.UniqueConstraint(fields=["consumer", "owner"], name="eventbus_member_unique")]

    def __str__(self) -> str:
        return f"{self.consumer}: {self.owner}"


class DeadLetter(models.Model):
    """An event a consumer failed to handle after all its retries."""

    consumer = models.CharField(max_length=255, db_index=True)
    event_id = models.CharField(max_length=64, db_index=True)
    topic = models.CharField(max_length=1024)
    event = models.JSONField()
    error = models.TextField()
    attempts = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        db_table = "django_eventbus_deadletter"
        ordering = ["-id"]
        verbose_name = "dead letter"

    def __str__(self) -> str:
        return f"{self.consumer}: {self.event_id}"
