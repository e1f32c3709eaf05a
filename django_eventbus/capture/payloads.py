"""The one place that turns model values into an event payload.

Payload: ``{"model": "app_label.model_name", "pk": …, "fields": {name: value}}``
plus ``"changed": {name: [old, new]}`` on tracked updates. Every value is typed
by its field first (``field.to_python``), so what is published is the value as
the database stores it, whatever Python object the instance held: a
``DecimalField`` is always its string with the field's ``decimal_places``
(``Decimal("7")`` and ``7`` both become ``"7.00"``). Then the project's one
encoder, :func:`django_eventbus.events.codec.to_jsonable`: Decimal and UUID as
strings, datetimes ISO 8601, durations ISO 8601, files by name, foreign keys by
pk, a custom field through its ``value_to_string`` (as ``dumpdata`` does).

Rows are ``{attname: value}`` dicts (an instance's loaded attributes, or a
``.values()`` row read from the database), so the signal receivers, the bulk
helpers and the m2m receiver build payloads the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast

from django.core.exceptions import ValidationError
from django.db import models
from django.db.backends.utils import format_number
from django.db.models.fields.files import FieldFile

from django_eventbus.events import EventSerializationError
from django_eventbus.events.codec import to_jsonable

__all__ = ["changed_values", "field_json", "instance_payload", "raw_values", "row_payload"]

Row = Mapping[str, Any]


def raw_values(instance: models.Model, fields: list[models.Field[Any, Any]]) -> dict[str, Any]:
    """The loaded attribute values of ``fields`` (deferred ones are left out)."""
    data = instance.__dict__
    return {f.attname: data[f.attname] for f in fields if f.attname in data}


def field_json(field: models.Field[Any, Any], value: Any) -> Any:
    """JSON for one field's value, typed by the field (what the database stores)."""
    if isinstance(value, FieldFile):
        return value.name or None
    if value is not None:
        # Not ours to validate: if the field refuses it, publish what was written.
        with contextlib.suppress(ValidationError):
            value = field.to_python(value)
        if isinstance(value, Decimal) and isinstance(field, models.DecimalField):
            # The column's scale, as the database adapters format it: "7.00", never "7".
            return format_number(value, field.max_digits, field.decimal_places)
    try:
        return to_jsonable(value)
    except EventSerializationError:
        # A custom field's own serialisation (the one dumpdata uses); value_to_string
        # reads the attribute from an object, so hand it one holding this value.
        return field.value_to_string(cast(Any, SimpleNamespace(**{field.attname: value})))


def changed_values(
    fields: list[models.Field[Any, Any]], old: Row, new: Row
) -> dict[str, tuple[Any, Any]] | None:
    """attname -> (old, new) of the fields whose stored value differs; ``None`` if a side is missing.

    Compared as published (through :func:`field_json`), so ``Decimal("7")`` equals
    ``7.00`` and a string UUID equals the UUID.
    """
    result = {}
    for field in fields:
        attname = field.attname
        if attname not in old or attname not in new:
            return None
        before, after = field_json(field, old[attname]), field_json(field, new[attname])
        if before != after:
            result[attname] = (old[attname], new[attname])
    return result


def row_payload(
    model: type[models.Model],
    fields: list[models.Field[Any, Any]],
    pk: Any,
    row: Row,
    changed: Mapping[str, tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """The event payload of one row (``attname -> value``) for the given (already filtered) fields."""
    meta = model._meta
    payload: dict[str, Any] = {
        "model": meta.label_lower,
        "pk": field_json(meta.pk, pk) if meta.pk is not None else pk,
        "fields": {f.name: field_json(f, row[f.attname]) for f in fields if f.attname in row},
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


def instance_payload(
    instance: models.Model,
    fields: list[models.Field[Any, Any]],
    changed: Mapping[str, tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """The event payload of ``instance`` as it is in memory."""
    return row_payload(type(instance), fields, instance.pk, raw_values(instance, fields), changed)
