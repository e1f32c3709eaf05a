"""Which models emit events, and the signal receivers that turn their saves into events.

Models are named in ``EVENTBUS["MODELS"]`` (``"app_label.ModelName": {options}``)
or decorated with :func:`track`; both end in one registry. Receivers are
connected per tracked model (never globally): a global ``post_delete``
receiver would make Django give up fast deletes for *every* model.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from django.apps import apps
from django.db import models
from django.db.models.signals import post_delete, post_init, post_save, pre_save

from .conf import MODEL_DEFAULTS, conf
from .context import current_correlation_id
from .events import Event, EventType
from .outbox import emit
from .payloads import instance_payload, raw_values

__all__ = ["ModelTracking", "connect_signals", "emit_model_events", "track", "tracking_for"]

logger = logging.getLogger("django_eventbus")

M = TypeVar("M", bound=type[models.Model])

EVENT_NAMES = {"created": EventType.CREATED, "updated": EventType.UPDATED, "deleted": EventType.DELETED}
SNAPSHOT_ATTR = "_eventbus_snapshot"  # loaded values, to tell what an UPDATE changed
_KNOWN = "_eventbus_known"  # whether the snapshot reflects the database row


@dataclasses.dataclass(frozen=True)
class ModelTracking:
    """How one model is tracked (resolved from its options)."""

    model: type[models.Model]
    topic: str
    fields: list[models.Field[Any, Any]]
    events: frozenset[EventType]
    track_changes: bool


# label_lower -> options, from @track; settings entries take precedence.
_decorated: dict[str, dict[str, Any]] = {}
_cache: dict[type[models.Model], ModelTracking | None] = {}
_connected: list[type[models.Model]] = []
_lock = threading.Lock()


def track(
    topic: str | None = None,
    *,
    fields: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    events: Sequence[str] = ("created", "updated", "deleted"),
    track_changes: bool = True,
) -> Callable[[M], M]:
    """Class decorator: emit events for this model (same options as ``EVENTBUS["MODELS"]``)."""

    def decorate(model: M) -> M:
        _decorated[model._meta.label_lower] = {
            "topic": topic,
            "fields": list(fields) if fields is not None else None,
            "exclude": list(exclude),
            "events": list(events),
            "track_changes": track_changes,
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
    concrete = [f for f in meta.concrete_fields if f.name not in excluded and f.attname not in excluded]
    if wanted is not None:
        concrete = [f for f in concrete if f.name in wanted or f.attname in wanted]
    return ModelTracking(
        model=model,
        topic=options.get("topic") or f"{meta.app_label}:{meta.model_name}",
        fields=concrete,
        events=frozenset(EVENT_NAMES[e] for e in options.get("events") or () if e in EVENT_NAMES),
        track_changes=bool(options.get("track_changes", True)),
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
            continue  # reported by the system check E004
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


# ------------------------------------------------------------------------------------------


def connect_signals() -> None:
    """(Re)connect the receivers to exactly the tracked models."""
    with _lock:
        for model in _connected:
            for signal in (post_init, pre_save, post_save, post_delete):
                signal.disconnect(sender=model, dispatch_uid="django_eventbus")
        _connected.clear()
        reset()
        for tracking in [] if captured_by_database() else tracked_models():
            model = tracking.model
            post_init.connect(_on_post_init, sender=model, dispatch_uid="django_eventbus", weak=False)
            pre_save.connect(_on_pre_save, sender=model, dispatch_uid="django_eventbus", weak=False)
            post_save.connect(_on_post_save, sender=model, dispatch_uid="django_eventbus", weak=False)
            post_delete.connect(_on_post_delete, sender=model, dispatch_uid="django_eventbus", weak=False)
            _connected.append(model)


def _event(tracking: ModelTracking, type_: EventType, payload: dict[str, Any]) -> Event:
    return Event(
        type=type_,
        topic=tracking.topic,
        payload=payload,
        source=conf.SOURCE,
        correlation_id=current_correlation_id(),
    )


def _on_post_init(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    tracking = tracking_for(sender)
    if tracking is not None and tracking.track_changes:
        instance.__dict__[SNAPSHOT_ATTR] = raw_values(instance, tracking.fields)


def _on_pre_save(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    # Loaded from the database (or saved before) means the snapshot is the row's state;
    # an instance built with an explicit pk and saved as an update has no known "before".
    instance.__dict__[_KNOWN] = instance._state.db is not None


def changes(
    tracking: ModelTracking, instance: models.Model, update_fields: Iterable[str] | None
) -> dict[str, tuple[Any, Any]] | None:
    """attname -> (old, new) of the tracked fields an UPDATE changed; ``None`` if unknown."""
    snapshot = instance.__dict__.get(SNAPSHOT_ATTR)
    if snapshot is None or not instance.__dict__.get(_KNOWN):
        return None
    current = raw_values(instance, tracking.fields)
    names = set(update_fields) if update_fields is not None else None
    result = {}
    for field in tracking.fields:
        attname = field.attname
        if names is not None and field.name not in names and attname not in names:
            continue
        if attname in current and attname in snapshot and current[attname] != snapshot[attname]:
            result[attname] = (snapshot[attname], current[attname])
        elif attname in current and attname not in snapshot:
            return None  # was deferred: we cannot tell what changed
    return result


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
    type_ = EventType.CREATED if created else EventType.UPDATED
    changed = None
    if type_ is EventType.UPDATED and tracking.track_changes:
        changed = changes(tracking, instance, update_fields)
        if changed == {}:
            # Decision: an update that changed no tracked field emits nothing (no noise,
            # no needless work for consumers). ``changed`` is absent when it is unknown.
            _remember(tracking, instance)
            return
    if tracking.track_changes:
        _remember(tracking, instance)
    if type_ not in tracking.events:
        return
    emit([_event(tracking, type_, instance_payload(instance, tracking.fields, changed))], using)


def _remember(tracking: ModelTracking, instance: models.Model) -> None:
    instance.__dict__[SNAPSHOT_ATTR] = raw_values(instance, tracking.fields)


def _on_post_delete(sender: type[models.Model], instance: models.Model, using: str, **kwargs: Any) -> None:
    tracking = tracking_for(sender)
    if tracking is None or EventType.DELETED not in tracking.events:
        return
    emit([_event(tracking, EventType.DELETED, instance_payload(instance, tracking.fields))], using)


def emit_model_events(
    instances: Iterable[models.Model],
    event_type: EventType | str,
    *,
    changed_fields: Sequence[str] | None = None,
    using: str | None = None,
) -> list[Event]:
    """Emit events for instances written without signals (``bulk_create``, ``bulk_update``, ``update``).

    Recorded and published on commit exactly like signal-driven events, in one batch.
    Instances of untracked models, and event types a model does not emit, are skipped.
    With ``changed_fields`` (UPDATED), the payload's ``changed`` lists those fields'
    old and new values where the instances were loaded from the database.
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
        changed = None
        if type_ is EventType.UPDATED and tracking.track_changes and changed_fields is not None:
            instance.__dict__[_KNOWN] = instance._state.db is not None
            changed = changes(tracking, instance, changed_fields)
            _remember(tracking, instance)
        events.append(_event(tracking, type_, instance_payload(instance, tracking.fields, changed)))
        db = db or instance._state.db
    emit(events, db)
    return events
