"""Events for bulk writes, which send no model signals.

``bulk_create``, ``bulk_update`` and ``QuerySet.update`` bypass ``post_save``;
use this queryset (``objects = EventBusManager()``, or
``EventBusQuerySet.as_manager()``) and they emit CREATED/UPDATED events like
single saves do — recorded in the same transaction, published in one batch
after commit. ``QuerySet.delete`` needs nothing: Django sends ``post_delete``
per row for tracked models. For code you cannot change, call
:func:`django_eventbus.emit_model_events` yourself after the bulk write.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import Any, TypeVar

from django.db import models, transaction

from .events import EventType
from .tracking import SNAPSHOT_ATTR, emit_model_events, tracking_for

__all__ = ["EventBusManager", "EventBusQuerySet"]

M = TypeVar("M", bound=models.Model)

_in_bulk_update: contextvars.ContextVar[bool] = contextvars.ContextVar("eventbus_bulk_update", default=False)


class EventBusQuerySet(models.QuerySet[M]):
    """A QuerySet whose bulk writes emit model events."""

    def bulk_create(self, objs: Iterable[M], *args: Any, **kwargs: Any) -> list[M]:
        created = super().bulk_create(objs, *args, **kwargs)
        # Without a returned pk (e.g. ignore_conflicts) an object's row may not be ours: skip it.
        emit_model_events([o for o in created if o.pk is not None], EventType.CREATED, using=self.db)
        return created

    def bulk_update(self, objs: Iterable[M], fields: Iterable[str], batch_size: int | None = None) -> int:
        objs = list(objs)
        fields = list(fields)
        # Django's bulk_update runs QuerySet.update() per batch: that must not emit as well.
        token = _in_bulk_update.set(True)
        try:
            count = super().bulk_update(objs, fields, batch_size=batch_size)
        finally:
            _in_bulk_update.reset(token)
        emit_model_events(objs, EventType.UPDATED, changed_fields=fields, using=self.db)
        return count

    def update(self, **kwargs: Any) -> int:
        """``UPDATE`` the rows, then emit UPDATED for each with its old and new values.

        Costs two more queries (the rows before and after), in one transaction;
        models that are not tracked skip both.
        """
        if tracking_for(self.model) is None or _in_bulk_update.get():
            return super().update(**kwargs)
        with transaction.atomic(using=self.db):
            before = {obj.pk: obj for obj in self.all().select_for_update()}
            count = super().update(**kwargs)
            after = list(self.model._default_manager.using(self.db).filter(pk__in=list(before)))
            for obj in after:
                old = before.get(obj.pk)
                if old is not None:
                    # Hand the "before" values over as the snapshot, so ``changed`` is exact.
                    obj.__dict__[SNAPSHOT_ATTR] = old.__dict__.get(SNAPSHOT_ATTR)
            emit_model_events(after, EventType.UPDATED, changed_fields=list(kwargs), using=self.db)
        return count


class EventBusManager(models.Manager[M]):
    """``objects = EventBusManager()``: a manager whose querysets emit events for bulk writes."""

    def get_queryset(self) -> EventBusQuerySet[M]:
        return EventBusQuerySet(self.model, using=self._db)
