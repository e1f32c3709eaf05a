"""The one place that turns a model instance into an event payload.

Payload: ``{"model": "app_label.model_name", "pk": …, "fields": {name: value}}``
plus ``"changed": {name: [old, new]}`` on tracked updates. Values go through
:func:`django_eventbus.events.codec.to_jsonable` (the project's one encoder)
and parse back with the field's ``to_python``: Decimal and UUID as strings,
datetimes ISO 8601, durations ISO 8601, files by name, foreign keys by pk.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from django.db import models
from django.db.models.fields.files import FieldFile

from .events import EventSerializationError
from .events.codec import to_jsonable

__all__ = ["field_json", "instance_payload", "raw_values"]


def raw_values(instance: models.Model, fields: list[models.Field[Any, Any]]) -> dict[str, Any]:
    """The loaded attribute values of ``fields`` (deferred ones are left out)."""
    data = instance.__dict__
    return {f.attname: data[f.attname] for f in fields if f.attname in data}


def field_json(field: models.Field[Any, Any], value: Any) -> Any:
    """JSON for one field's raw attribute value."""
    if isinstance(value, FieldFile):
        return value.name or None
    try:
        return to_jsonable(value)
    except EventSerializationError:
        # A custom field's own serialisation (the one dumpdata uses); value_to_string
        # reads the attribute from an object, so hand it one holding this value.
        return field.value_to_string(cast(Any, SimpleNamespace(**{field.attname: value})))


def instance_payload(
    instance: models.Model,
    fields: list[models.Field[Any, Any]],
    changed: dict[str, tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """The event payload of ``instance`` for the given (already filtered) fields."""
    meta = instance._meta
    data = instance.__dict__
    values = {f.name: field_json(f, data[f.attname]) for f in fields if f.attname in data}
    payload: dict[str, Any] = {
        "model": meta.label_lower,
        "pk": field_json(meta.pk, instance.pk) if meta.pk is not None else None,
        "fields": values,
    }
    if changed is not None:
        by_attname = {f.attname: f for f in fields}
        payload["changed"] = {
            by_attname[attname].name: [
                field_json(by_attname[attname], old),
                field_json(by_attname[attname], new),
            ]
            for attname, (old, new) in changed.items()
        }
    return payload
