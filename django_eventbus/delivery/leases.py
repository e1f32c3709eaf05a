"""Leases: one listener process owns a durable consumer at a time; its cursor writes are fenced.

The lease lives on the consumer's cursor row (:class:`~django_eventbus.models.ConsumerCursor`:
``owner``, ``generation``, ``owner_since``, ``expires_at``) in Django's database —
no new component. Every call here is one statement:

* :func:`acquire` — one conditional UPDATE: the row is free, expired or already
  ours; it takes the lease, bumps ``generation`` and sets ``expires_at`` from the
  database clock (``NOW() + LEASE_TTL``), so the listeners' clocks never matter.
* :func:`renew` — the owner's heartbeat (every ``LEASE_TTL / 3``).
* :func:`save_cursor` — the cursor write, ``WHERE name = … AND owner = … AND
  generation = …``: 0 rows means another listener took the lease (this one was
  paused, partitioned or too slow to renew), and the caller must stop handling
  the consumer at once instead of writing over the new owner's cursor.
* :func:`release` — on a clean stop, so a standby takes over within its retry
  interval instead of waiting for the expiry.

The owner also keeps a local deadline (:class:`Lease.valid`): a process that was
stopped (SIGSTOP, a long GC pause) past its TTL stops handling as soon as it
runs again, before its next heartbeat tells it the lease is gone.

Partitioned consumers (:mod:`django_eventbus.delivery.partitions`) lease each partition
like a consumer. Their listeners also keep a membership row each
(:class:`~django_eventbus.models.ConsumerMember`: :func:`join`, :func:`members`,
:func:`leave`) to count each other and take a fair share of the partitions.

On SQLite the same statements work, but one listener is assumed (development).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import time
from datetime import timedelta

from django.db.models import DateTimeField, ExpressionWrapper, F, Q, Value
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Now
from django.utils import timezone

from django_eventbus.conf import conf
from django_eventbus.models import ConsumerCursor, ConsumerMember

__all__ = [
    "Lease",
    "acquire",
    "ensure_cursor",
    "join",
    "leave",
    "members",
    "new_owner",
    "release",
    "renew",
    "save_cursor",
]


def new_owner() -> str:
    """``host:pid:random``: unique per listener, and readable by an operator (eventbus_status)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclasses.dataclass
class Lease:
    """This process's view of its lease on one consumer."""

    name: str
    owner: str
    #: the generation this process holds, or None while it stands by
    generation: int | None = None
    #: time.monotonic() after which the lease may have passed to another process
    valid_until: float = 0.0
    #: time.monotonic() of the last successful acquire / renew / fenced write
    renewed_at: float = 0.0

    @property
    def valid(self) -> bool:
        return self.generation is not None and time.monotonic() < self.valid_until

    def held(self, generation: int, started: float) -> None:
        # Measured from before the statement was sent: the database's expiry is at least
        # this late, so the local deadline never outlives the lease.
        self.generation = generation
        self.valid_until = started + conf.LEASE_TTL
        self.renewed_at = started

    def lost(self) -> None:
        self.generation = None
        self.valid_until = 0.0


def _expiry() -> ExpressionWrapper[CombinedExpression]:
    return ExpressionWrapper(Now() + Value(timedelta(seconds=conf.LEASE_TTL)), output_field=DateTimeField())


def ensure_cursor(name: str, position: int) -> None:
    """Create the cursor row at ``position`` unless it exists (another listener may race us)."""
    ConsumerCursor.objects.bulk_create(
        [ConsumerCursor(name=name, position=position, handled=[])], ignore_conflicts=True
    )


def acquire(name: str, owner: str) -> int | None:
    """Take the lease if it is free, expired or ours; the new generation, or None if another owns it."""
    taken = (
        ConsumerCursor.objects.filter(name=name)
        .filter(Q(owner="") | Q(expires_at__isnull=True) | Q(expires_at__lt=Now()) | Q(owner=owner))
        .update(
            owner=owner,
            generation=F("generation") + 1,
            owner_since=Now(),
            expires_at=_expiry(),
        )
    )
    if not taken:
        return None
    generation = ConsumerCursor.objects.filter(name=name, owner=owner).values_list("generation", flat=True)
    return generation.first()


def renew(name: str, owner: str, generation: int) -> bool:
    """Extend the lease; False if it was lost."""
    return bool(
        ConsumerCursor.objects.filter(name=name, owner=owner, generation=generation).update(
            expires_at=_expiry()
        )
    )


def save_cursor(name: str, owner: str, generation: int, position: int, handled: list[str]) -> bool:
    """The fenced cursor write (it also renews the lease); False if the lease was lost."""
    return bool(
        ConsumerCursor.objects.filter(name=name, owner=owner, generation=generation).update(
            position=position, handled=handled, updated_at=Now(), expires_at=_expiry()
        )
    )


def release(name: str, owner: str, generation: int) -> None:
    """Give the lease up (clean stop): a standby may take it at its next try."""
    ConsumerCursor.objects.filter(name=name, owner=owner, generation=generation).update(
        owner="", expires_at=None
    )


def join(consumer: str, owner: str) -> None:
    """Say (again) that listener ``owner`` runs ``consumer``, for ``LEASE_TTL`` from now."""
    ConsumerMember.objects.filter(consumer=consumer, expires_at__lt=Now()).delete()  # the departed
    if not ConsumerMember.objects.filter(consumer=consumer, owner=owner).update(expires_at=_expiry()):
        ConsumerMember.objects.bulk_create(
            [ConsumerMember(consumer=consumer, owner=owner, expires_at=timezone.now())],
            ignore_conflicts=True,
        )
        ConsumerMember.objects.filter(consumer=consumer, owner=owner).update(expires_at=_expiry())


def members(consumer: str) -> int:
    """How many listeners run ``consumer`` now (one read; :func:`join` deletes the expired)."""
    return ConsumerMember.objects.filter(consumer=consumer, expires_at__gte=Now()).count()


def leave(consumer: str, owner: str) -> None:
    """A clean stop: the other listeners take this one's share at their next count."""
    ConsumerMember.objects.filter(consumer=consumer, owner=owner).delete()
