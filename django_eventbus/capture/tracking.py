"""Which models emit events, and the signal receivers that turn their writes into events.

Models are named in ``EVENTBUS["MODELS"]`` (``"app_label.ModelName": {options}``)
or decorated with :func:`track`; both end in one registry. Receivers are
connected per tracked model (never globally): a global ``post_delete``
receiver would make Django give up fast deletes for *every* model.

The log must equal the table, so what an event says comes from the database,
never from an in-memory snapshot (a stale instance saving an old value back is
a real write):

- every ``save()`` that writes the row emits; an UPDATE of a model with
  ``track_changes`` first reads the row as stored, locked
  (``select_for_update``), inside the saving transaction: ``changed`` is the
  difference between that row and the row after the write, exact under
  concurrent writers. When it cannot be known (an instance built with an
  explicit pk that overwrites a row) it is absent, never guessed;
- ``skip_unchanged`` (opt-in) drops an UPDATE whose tracked fields equal the
  locked row;
- tracked saves run in one transaction with their log rows even in autocommit
  (:func:`_in_one_transaction`); deletes already do (Django's collector);
- ``m2m_changed`` of a tracked model's many-to-many fields becomes UPDATED;
- a tracked write to another database than ``DATABASE_ALIAS`` is refused before
  it happens (its log row could not share its transaction).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import models, router, transaction
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save

from django_eventbus import tracing
from django_eventbus.conf import MODEL_DEFAULTS, conf
from django_eventbus.events import Event, EventType

from .context import current_correlation_id
from .outbox import emit
from .payloads import changed_values, field_json, instance_payload, raw_values, row_payload

__all__ = ["ModelTracking", "connect_signals", "emit_model_events", "track", "tracking_for"]

logger = logging.getLogger("django_eventbus")

M = TypeVar("M", bound=type[models.Model])
Row = Mapping[str, Any]

EVENT_NAMES = {"created": EventType.CREATED, "updated": EventType.UPDATED, "deleted": EventType.DELETED}
_BEFORE = "_eventbus_before"  # the row as locked in pre_save (or _ABSENT), consumed by post_save
_M2M_BEFORE = "_eventbus_m2m_before"  # per m2m field: (rows, old pk lists), from pre_add/remove/clear
_ABSENT: Row = {}  # the pre-read found no row: the save inserts it
_UID = "django_eventbus"


@dataclasses.dataclass(frozen=True)
class ModelTracking:
    """How one model is tracked (resolved from its options)."""

    model: type[models.Model]
    topic: str
    fields: list[models.Field[Any, Any]]
    events: frozenset[EventType]
    track_changes: bool
    skip_unchanged: bool = False
    m2m: tuple[models.ManyToManyField[Any, Any], ...] = ()


# label_lower -> options, from @track; settings entries take precedence.
_decorated: dict[str, dict[str, Any]] = {}
_cache: dict[type[models.Model], ModelTracking | None] = {}
_connected: list[type[models.Model]] = []
# through model -> the tracked many-to-many fields it stores.
_through_fields: dict[type[models.Model], list[models.ManyToManyField[Any, Any]]] = {}
# model -> the save_base it had in its own __dict__ before we wrapped it (None: inherited).
_wrapped: dict[type[models.Model], Any] = {}
_lock = threading.Lock()


def track(
    topic: str | None = None,
    *,
    fields: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    events: Sequence[str] = ("created", "updated", "deleted"),
    track_changes: bool = True,
    skip_unchanged: bool = False,
) -> Callable[[M], M]:
    """Class decorator: emit events for this model (same options as ``EVENTBUS["MODELS"]``)."""

    def decorate(model: M) -> M:
        _decorated[model._meta.label_lower] = {
            "topic": topic,
            "fields": list(fields) if fields is not None else None,
            "exclude": list(exclude),
            "events": list(events),
            "track_changes": track_changes,
            "skip_unchanged": skip_unchanged,
        }
        reset()
        if apps.ready:
            connect_signals()
        return model

    return decorate


def configured_models() -> dict[str, dict[str, Any]]:
    """label_lower -> merged options of every tracked model (unresolved labels included)."""
    merged = {label: {**MODEL_DEFAULTS, **options} for label, options in _decorated.items()}
    for label, options in conf.MODELS.items():
        merged[label.lower()] = {**MODEL_DEFAULTS, **(options or {})}
    return merged


def _resolve(model: type[models.Model], options: Mapping[str, Any]) -> ModelTracking:
    meta = model._meta
    excluded = set(options.get("exclude") or ()) | set(conf.EXCLUDE_FIELDS)
    wanted = options.get("fields")

    def chosen(field: models.Field[Any, Any]) -> bool:
        names = {field.name, field.attname}
        return not names & excluded and (wanted is None or bool(names & set(wanted)))

    return ModelTracking(
        model=model,
        topic=options.get("topic") or f"{meta.app_label}:{meta.model_name}",
        fields=[f for f in meta.concrete_fields if chosen(f)],
        events=frozenset(EVENT_NAMES[e] for e in options.get("events") or () if e in EVENT_NAMES),
        track_changes=bool(options.get("track_changes", True)),
        skip_unchanged=bool(options.get("skip_unchanged", False)),
        m2m=tuple(f for f in meta.many_to_many if isinstance(f, models.ManyToManyField) and chosen(f)),
    )


def tracking_for(model: type[models.Model]) -> ModelTracking | None:
    """How ``model`` is tracked, or ``None``."""
    try:
        return _cache[model]
    except KeyError:
        pass
    options = configured_models().get(model._meta.label_lower)
    result = _resolve(model, options) if options is not None else None
    _cache[model] = result
    return result


def tracked_models() -> list[ModelTracking]:
    found = []
    for label in configured_models():
        try:
            model = apps.get_model(label)
        except (LookupError, ValueError):
            continue  # reported by the system check E007
        tracking = tracking_for(model)
        if tracking is not None:
            found.append(tracking)
    return found


def reset() -> None:
    _cache.clear()


# --- database capture -------------------------------------------------------------------
# With EVENTBUS["CAPTURE"] = "database" PostgreSQL triggers write every tracked model's
# events (capture_database.py): the signal receivers and the explicit bulk API stand down,
# or each write would be logged twice. What is tracked is still named only here.
def captured_by_database() -> bool:
    return conf.CAPTURE == "database"


def _wake_relay(sender: type[models.Model], using: str, **kwargs: Any) -> None:
    # The trigger wrote the log row; an ORM write wakes the relay once its transaction
    # commits, so the event goes out at once instead of at the relay's next poll.
    from django_eventbus.delivery.relay import wake_after_commit

    wake_after_commit(using)


# ------------------------------------------------------------------------------------------


def connect_signals() -> None:
    """(Re)connect the receivers, and the save wrapper, to exactly the tracked models."""
    with _lock:
        for model in _connected:
            for signal in (pre_save, post_save, pre_delete, post_delete):
                signal.disconnect(sender=model, dispatch_uid=_UID)
        for through in _through_fields:
            m2m_changed.disconnect(sender=through, dispatch_uid=_UID)
        for model, original in reversed(_wrapped.items()):
            if original is None:
                del model.save_base
            else:
                model.save_base = original  # type: ignore[method-assign]
        _connected.clear()
        _through_fields.clear()
        _wrapped.clear()
        reset()
        database = captured_by_database()
        for tracking in tracked_models():
            model = tracking.model
            _connected.append(model)
            # Many-to-many changes are rows of the through table, which no trigger of the
            # model sees: they are captured from m2m_changed in both modes.
            for field in tracking.m2m:
                through = _through(field)
                m2m_changed.connect(_on_m2m_changed, sender=through, dispatch_uid=_UID, weak=False)
                _through_fields.setdefault(through, []).append(field)
            if database:
                post_save.connect(_wake_relay, sender=model, dispatch_uid=_UID, weak=False)
                post_delete.connect(_wake_relay, sender=model, dispatch_uid=_UID, weak=False)
                continue
            pre_save.connect(_on_pre_save, sender=model, dispatch_uid=_UID, weak=False)
            post_save.connect(_on_post_save, sender=model, dispatch_uid=_UID, weak=False)
            pre_delete.connect(_on_pre_delete, sender=model, dispatch_uid=_UID, weak=False)
            post_delete.connect(_on_post_delete, sender=model, dispatch_uid=_UID, weak=False)
            if model not in _wrapped:
                _wrapped[model] = model.__dict__.get("save_base")
                model.save_base = _in_one_transaction(model.save_base)  # type: ignore[method-assign]


def _in_one_transaction(save_base: Callable[..., Any]) -> Callable[..., Any]:
    """``save_base`` run inside ``atomic(savepoint=False)`` when the caller is in autocommit.

    In autocommit Django commits the row before ``post_save`` runs, so the log row
    would commit on its own and a crash in between would lose the event. Wrapped,
    the row, its pre-read lock and its log row commit together or not at all; an
    exception rolls back and leaves no transaction open (it is ``atomic``). Inside
    an atomic block this adds nothing. Django does the same itself for models with
    parents (``save_base`` opens ``atomic(savepoint=False)`` for them).
    """

    @functools.wraps(save_base)
    def save_base_atomic(
        self: models.Model,
        raw: bool = False,
        force_insert: Any = False,
        force_update: bool = False,
        using: str | None = None,
        update_fields: Iterable[str] | None = None,
    ) -> Any:
        using = using or router.db_for_write(type(self), instance=self)
        kwargs = {"raw": raw, "force_insert": force_insert, "force_update": force_update}
        if transaction.get_connection(using).in_atomic_block:
            return save_base(self, using=using, update_fields=update_fields, **kwargs)
        with transaction.atomic(using=using, savepoint=False):
            return save_base(self, using=using, update_fields=update_fields, **kwargs)

    return save_base_atomic


def require_log_database(model: type[models.Model], using: str | None) -> None:
    """Refuse, before the write, a tracked write to another database than the event log's."""
    alias = conf.DATABASE_ALIAS
    if using is not None and using != alias:
        raise ImproperlyConfigured(
            f"{model._meta.label} is tracked by django-eventbus, but this write goes to database "
            f"{using!r} while the event log is on {alias!r} (EVENTBUS['DATABASE_ALIAS']): its event "
            "could not be written in the same transaction, so it would be lost or outlive a rollback. "
            f"Route {model._meta.label}'s writes to {alias!r}, or stop tracking it."
        )


def _event(tracking: ModelTracking, type_: EventType, payload: dict[str, Any]) -> Event:
    return Event(
        type=type_,
        topic=tracking.topic,
        payload=payload,
        source=conf.SOURCE,
        correlation_id=current_correlation_id(),
        metadata=tracing.inject({}),
    )


def read_rows(
    tracking: ModelTracking, queryset: models.QuerySet[Any], *, lock: bool
) -> dict[Any, dict[str, Any]]:
    """pk -> ``{attname: value}`` of the tracked fields, as stored (locked, in a transaction)."""
    # Ordered by pk: concurrent writers lock rows in one order (no deadlock), events come in pk order.
    queryset = queryset.order_by("pk")
    if lock and transaction.get_connection(queryset.db).in_atomic_block:
        queryset = queryset.select_for_update()
    rows = queryset.values("pk", *(f.attname for f in tracking.fields))
    return {row.pop("pk"): row for row in rows}


def _table(tracking: ModelTracking, using: str) -> models.QuerySet[Any]:
    return tracking.model._base_manager.db_manager(using).all()


def _wants_before(tracking: ModelTracking, instance: models.Model, update_fields: Any) -> bool:
    if instance.pk is None or EventType.UPDATED not in tracking.events:
        return False
    # A new instance is an INSERT but for the rare explicit pk overwriting a row; reading
    # before every create would cost a query each, so that case has no ``changed``.
    if instance._state.adding and update_fields is None:
        return False
    return tracking.track_changes or tracking.skip_unchanged or update_fields is not None


def _on_pre_save(
    sender: type[models.Model],
    instance: models.Model,
    raw: bool,
    using: str,
    update_fields: Iterable[str] | None,
    **kwargs: Any,
) -> None:
    tracking = tracking_for(sender)
    if tracking is None or (raw and not conf.EMIT_RAW):
        return
    require_log_database(sender, using)
    instance.__dict__.pop(_BEFORE, None)
    if _wants_before(tracking, instance, update_fields):
        rows = read_rows(tracking, _table(tracking, using).filter(pk=instance.pk), lock=True)
        instance.__dict__[_BEFORE] = rows.get(instance.pk, _ABSENT)


def _is_expression(value: Any) -> bool:
    return hasattr(value, "resolve_expression")


def _written(
    tracking: ModelTracking, instance: models.Model, names: Collection[str] | None
) -> dict[str, Any]:
    """attname -> value the save wrote, for the tracked fields it wrote."""
    values = raw_values(instance, tracking.fields)
    if names is None:
        return values
    return {
        f.attname: values[f.attname]
        for f in tracking.fields
        if f.attname in values and (f.name in names or f.attname in names)
    }


def _on_post_save(
    sender: type[models.Model],
    instance: models.Model,
    created: bool,
    raw: bool,
    using: str,
    update_fields: Iterable[str] | None,
    **kwargs: Any,
) -> None:
    tracking = tracking_for(sender)
    if tracking is None or (raw and not conf.EMIT_RAW):
        return
    # The row as stored before the write; None when unknown (not read, or no row found).
    before: Row | None = instance.__dict__.pop(_BEFORE, None) or None
    if created:
        if EventType.CREATED in tracking.events:
            emit([_event(tracking, EventType.CREATED, instance_payload(instance, tracking.fields))], using)
        return
    names = None if update_fields is None else set(update_fields)
    written = _written(tracking, instance, names)
    if any(_is_expression(v) for v in written.values()) or (before is None and names is not None):
        # F() expressions: only the database knows the result (our UPDATE holds the row lock).
        after: Row = read_rows(tracking, _table(tracking, using).filter(pk=instance.pk), lock=False).get(
            instance.pk, written
        )
    elif before:
        after = {**before, **written}  # update_fields: the other columns are as stored
    else:
        after = written
    event = _update_event(tracking, instance.pk, before, after)
    if event is not None:
        emit([event], using)


def _update_event(tracking: ModelTracking, pk: Any, before: Row | None, after: Row) -> Event | None:
    """The UPDATED event of one row; ``None`` if the model does not emit it (or skips it)."""
    if EventType.UPDATED not in tracking.events:
        return None
    changed = changed_values(tracking.fields, before, after) if before is not None else None
    if tracking.skip_unchanged and changed == {}:
        return None
    shown = changed if tracking.track_changes else None
    payload = row_payload(tracking.model, tracking.fields, pk, after, shown)
    return _event(tracking, EventType.UPDATED, payload)


def _on_pre_delete(sender: type[models.Model], instance: models.Model, using: str, **kwargs: Any) -> None:
    require_log_database(sender, using)


def _on_post_delete(sender: type[models.Model], instance: models.Model, using: str, **kwargs: Any) -> None:
    tracking = tracking_for(sender)
    if tracking is None or EventType.DELETED not in tracking.events:
        return
    emit([_event(tracking, EventType.DELETED, instance_payload(instance, tracking.fields))], using)


def _m2m_lists(
    field: models.ManyToManyField[Any, Any], using: str, pks: Collection[Any]
) -> dict[Any, list[Any]]:
    """pk -> sorted related pks, for rows of the model that declares ``field``."""
    pairs, source, target = _through_pairs(field, using)
    lists: dict[Any, list[Any]] = {pk: [] for pk in pks}
    pairs = pairs.filter(**{f"{source}__in": list(pks)})
    for pk, related in pairs.values_list(source, target):
        lists[pk].append(related)
    return {pk: sorted(related) for pk, related in lists.items()}


def _on_m2m_changed(
    sender: type[models.Model],
    instance: models.Model,
    action: str,
    reverse: bool,
    pk_set: set[Any] | None,
    using: str,
    **kwargs: Any,
) -> None:
    """A many-to-many change of a tracked model becomes UPDATED of each row whose list changed.

    ``fields`` is the row (as stored) plus the new sorted pk list, ``changed`` the
    list before and after. Django sends the same signal for both sides of the
    relation: ``reverse`` says the instance is on the other side and ``pk_set``
    (or, for ``clear``, the relation itself) names the tracked rows.
    """
    phase, _, verb = action.partition("_")
    for field in _through_fields.get(sender, ()):
        tracking = tracking_for(field.model)
        if tracking is None:
            continue
        key = f"{_M2M_BEFORE}:{field.name}"
        if phase == "pre":
            require_log_database(field.model, using)
            if reverse and verb == "clear":
                pks: Collection[Any] = _m2m_sources_of(field, using, instance.pk)
            else:
                pks = set(pk_set or ()) if reverse else {instance.pk}
            # Lock the tracked rows: concurrent relation changes of one row serialize here.
            rows = read_rows(tracking, _table(tracking, using).filter(pk__in=list(pks)), lock=True)
            instance.__dict__[key] = (rows, _m2m_lists(field, using, rows))
            continue
        rows, old = instance.__dict__.pop(key, ({}, {}))
        new = _m2m_lists(field, using, rows)
        events = []
        for pk, row in rows.items():
            if old[pk] == new[pk] or EventType.UPDATED not in tracking.events:
                continue
            payload = row_payload(tracking.model, tracking.fields, pk, row)
            related_pk = field.target_field
            payload["fields"][field.name] = [field_json(related_pk, v) for v in new[pk]]
            if tracking.track_changes:
                payload["changed"] = {
                    field.name: [[field_json(related_pk, v) for v in old[pk]], payload["fields"][field.name]]
                }
            events.append(_event(tracking, EventType.UPDATED, payload))
        emit(events, using)


def _m2m_sources_of(field: models.ManyToManyField[Any, Any], using: str, target_pk: Any) -> list[Any]:
    pairs, source, target = _through_pairs(field, using)
    return list(pairs.filter(**{target: target_pk}).values_list(source, flat=True))


def _through_pairs(
    field: models.ManyToManyField[Any, Any], using: str
) -> tuple[models.QuerySet[Any], str, str]:
    """The relation's rows, and the attnames of its (tracked model, related model) columns."""
    through = _through(field)
    meta = through._meta
    source = cast("models.Field[Any, Any]", meta.get_field(field.m2m_field_name())).attname
    target = cast("models.Field[Any, Any]", meta.get_field(field.m2m_reverse_field_name())).attname
    return through._base_manager.db_manager(using).all(), source, target


def _through(field: models.ManyToManyField[Any, Any]) -> type[models.Model]:
    through = field.remote_field.through
    if through is None:  # only before the app registry resolved it
        raise ImproperlyConfigured(f"{field} has no through model yet")
    return through


def update_events(
    tracking: ModelTracking, before: Mapping[Any, Row], after: Mapping[Any, Row]
) -> list[Event]:
    """UPDATED events of rows read before (locked) and after a write, in ``after``'s order."""
    events = []
    for pk, row in after.items():
        event = _update_event(tracking, pk, before.get(pk), row)
        if event is not None:
            events.append(event)
    return events


def emit_model_events(
    instances: Iterable[models.Model],
    event_type: EventType | str,
    *,
    changed_fields: Sequence[str] | None = None,
    before: Mapping[Any, Row] | None = None,
    using: str | None = None,
) -> list[Event]:
    """Emit events for instances written without signals (``bulk_create``, ``bulk_update``, ``update``).

    Recorded and published on commit exactly like signal-driven events, in one batch.
    Instances of untracked models, and event types a model does not emit, are skipped.
    UPDATED: ``changed_fields`` names the fields the write set; ``before`` (pk ->
    ``{attname: value}``, the rows as read, locked, before the write, e.g. with
    ``select_for_update().values()``) makes ``changed`` exact and fills the other
    fields as stored. Without ``before``, ``changed`` is absent and ``fields`` are
    the instance's values.
    """
    type_ = EventType(event_type)
    if captured_by_database():
        return []  # the triggers logged these writes already
    events: list[Event] = []
    db = using
    for instance in instances:
        tracking = tracking_for(type(instance))
        if tracking is None or type_ not in tracking.events:
            continue
        db = db or instance._state.db
        if type_ is not EventType.UPDATED:
            events.append(_event(tracking, type_, instance_payload(instance, tracking.fields)))
            continue
        old = before.get(instance.pk) if before is not None else None
        written = _written(tracking, instance, None if changed_fields is None else set(changed_fields))
        event = _update_event(tracking, instance.pk, old, {**(old or {}), **written})
        if event is not None:
            events.append(event)
    emit(events, db)
    return events
