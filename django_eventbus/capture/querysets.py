"""Events for bulk writes, which send no model signals.

``bulk_create``, ``bulk_update`` and ``QuerySet.update`` bypass ``post_save``;
use this queryset (``objects = EventBusManager()``, or
``EventBusQuerySet.as_manager()``) and they emit CREATED/UPDATED events like
single saves do — recorded in the same transaction (each call runs in
``atomic``, so also in autocommit), published in one batch after commit.
Updates read the rows as stored, locked, before the write, so ``changed`` is
exact under concurrent writers. ``QuerySet.delete`` needs nothing: Django sends
``post_delete`` per row for tracked models. For code you cannot change, call
:func:`django_eventbus.emit_model_events` yourself after the bulk write.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from django.db import models, transaction

from django_eventbus.events import EventType

from .outbox import emit
from .tracking import (
    ModelTracking,
    captured_by_database,
    emit_model_events,
    read_rows,
    require_log_database,
    tracking_for,
    update_events,
)

__all__ = ["EventBusManager", "EventBusQuerySet"]

M = TypeVar("M", bound=models.Model)
T = TypeVar("T")

# Rows per query when reading by pk: SQLite allows 32,766 parameters a statement.
CHUNK = 1000

_in_bulk_update: contextvars.ContextVar[bool] = contextvars.ContextVar("eventbus_bulk_update", default=False)


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def _signal_tracking(model: type[models.Model]) -> ModelTracking | None:
    # With database capture the triggers log every write: these methods add nothing.
    return None if captured_by_database() else tracking_for(model)


def _wake_if_captured(model: type[models.Model], using: str) -> None:
    # After the write: in a transaction the wake waits for its commit, in autocommit the
    # rows are already committed.
    if captured_by_database() and tracking_for(model) is not None:
        from django_eventbus.delivery.relay import wake_after_commit

        wake_after_commit(using)


class EventBusQuerySet(models.QuerySet[M]):
    """A QuerySet whose bulk writes emit model events."""

    def bulk_create(self, objs: Iterable[M], *args: Any, **kwargs: Any) -> list[M]:
        if _signal_tracking(self.model) is None:
            created = super().bulk_create(objs, *args, **kwargs)
            _wake_if_captured(self.model, self.db)
            return created
        require_log_database(self.model, self.db)
        with transaction.atomic(using=self.db, savepoint=False):
            created = super().bulk_create(objs, *args, **kwargs)
            # Without a returned pk (e.g. ignore_conflicts) an object's row may not be ours: skip it.
            emit_model_events([o for o in created if o.pk is not None], EventType.CREATED, using=self.db)
        return created

    def bulk_update(self, objs: Iterable[M], fields: Iterable[str], batch_size: int | None = None) -> int:
        tracking = _signal_tracking(self.model)
        if tracking is None:
            count = super().bulk_update(objs, fields, batch_size=batch_size)
            _wake_if_captured(self.model, self.db)
            return count
        require_log_database(self.model, self.db)
        objs = list(objs)
        fields = list(fields)
        with transaction.atomic(using=self.db, savepoint=False):
            before = self._read([o.pk for o in objs], lock=True)
            # Django's bulk_update runs QuerySet.update() per batch: that must not emit as well.
            token = _in_bulk_update.set(True)
            try:
                count = super().bulk_update(objs, fields, batch_size=batch_size)
            finally:
                _in_bulk_update.reset(token)
            # Read back: the written values may be expressions, and the rest is as stored.
            after = self._read(list(before), lock=False)
            emit(update_events(tracking, before, after), self.db)
        return count

    def update(self, **kwargs: Any) -> int:
        """``UPDATE`` the rows, then emit UPDATED for each with its old and new values.

        Costs two more queries (the rows before, locked, and after), in one
        transaction; models that are not tracked skip both.
        """
        tracking = _signal_tracking(self.model)
        if tracking is None or _in_bulk_update.get():
            count = super().update(**kwargs)
            _wake_if_captured(self.model, self.db)
            return count
        require_log_database(self.model, self.db)
        with transaction.atomic(using=self.db, savepoint=False):
            before = read_rows(tracking, self, lock=True)
            # Only the locked rows: one that starts matching meanwhile would change unlogged.
            count = sum(
                models.QuerySet.update(self.filter(pk__in=pks), **kwargs) for pks in _chunks(list(before))
            )
            after = self._read(list(before), lock=False)
            emit(update_events(tracking, before, after), self.db)
        return count

    def _read(self, pks: list[Any], *, lock: bool) -> dict[Any, dict[str, Any]]:
        tracking = tracking_for(self.model)
        assert tracking is not None
        table = self.model._base_manager.db_manager(self.db)
        rows: dict[Any, dict[str, Any]] = {}
        for chunk in _chunks(pks):
            rows.update(read_rows(tracking, table.filter(pk__in=chunk), lock=lock))
        return rows


class EventBusManager(models.Manager[M]):
    """``objects = EventBusManager()``: a manager whose querysets emit events for bulk writes."""

    def get_queryset(self) -> EventBusQuerySet[M]:
        return EventBusQuerySet(self.model, using=self._db)
