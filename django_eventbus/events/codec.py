"""The one JSON codec of the project: events to and from the wire, values to JSON.

Every backend encodes with :func:`dumps_event` and decodes with
:func:`loads_event`; the Django layer turns model field values into JSON with
:func:`to_jsonable`. There is no other encoder.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Mapping
from typing import Any

from .errors import EventSerializationError
from .types import Event

__all__ = [
    "MAX_DEPTH",
    "check_event",
    "dumps",
    "dumps_event",
    "duration_iso_string",
    "loads",
    "loads_event",
    "to_jsonable",
]

#: Deepest nesting of arrays and objects :func:`loads` accepts. An event's payload sits
#: two levels down; model payloads use four. Deeper input is hostile or broken: the C
#: parser itself raises ``RecursionError`` (not ``ValueError``) a little below 1,000,
#: and a value that parses just under that still overflows the stack later, in code
#: that walks it recursively (freezing, encoding, templates).
MAX_DEPTH = 64


def check_event(event: Event) -> None:
    """Raise :class:`EventSerializationError` if the event cannot travel as JSON."""
    if event.json_problem is not None:
        raise EventSerializationError(
            f"event {event.event_id} on topic {event.topic!r} is not JSON-serializable: {event.json_problem}"
        )


# One encoder object: json.dumps with options builds a new JSONEncoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any) -> str:
    """Compact, strict JSON (no NaN), UTF-8 kept as is."""
    return _ENCODER.encode(value)


def dumps_event(event: Event) -> str:
    """Encode an event for a transport; raises :class:`EventSerializationError` if it cannot be."""
    check_event(event)
    return dumps(event.to_dict())


def loads(data: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` for untrusted input: ``ValueError`` for anything that is not JSON
    nested at most ``max_depth`` deep (never ``RecursionError``)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"not JSON: nested deeper than {max_depth} levels") from None
    except (TypeError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"not JSON: {exc}") from exc
    # Counting brackets runs at C speed; only input with enough of them to be too deep is walked.
    if isinstance(data, str):
        brackets = data.count("[") + data.count("{")
    else:
        brackets = data.count(b"[") + data.count(b"{")
    if brackets > max_depth and _deeper_than(value, max_depth):
        raise ValueError(f"not JSON: nested deeper than {max_depth} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    # Iterative on purpose: the point is to never recurse as deep as the input.
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in item)
    return False


def loads_event(data: str | bytes | Mapping[str, Any]) -> Event:
    """Decode what :func:`dumps_event` produced; ``ValueError`` on anything else."""
    if isinstance(data, Mapping):
        return Event.from_dict(data)
    decoded = loads(data)
    if not isinstance(decoded, dict):
        raise ValueError(f"not an event object: {type(decoded).__name__}")
    return Event.from_dict(decoded)


def duration_iso_string(value: dt.timedelta) -> str:
    """ISO 8601 duration in the form Django's ``DurationField`` parses back."""
    sign = "-" if value < dt.timedelta(0) else ""
    value = abs(value)
    minutes, seconds = divmod(value.seconds, 60)
    hours, minutes = divmod(minutes, 60)
    ms = f".{value.microseconds:06d}" if value.microseconds else ""
    return f"{sign}P{value.days}DT{hours:02d}H{minutes:02d}M{seconds:02d}{ms}S"


def to_jsonable(value: Any) -> Any:
    """Convert a Python value to JSON-native data that parses back to the same value.

    Decimal and UUID become strings, datetimes/dates/times ISO 8601, timedelta an ISO
    duration, bytes base64, sets sorted lists; containers are converted recursively.
    Anything else raises :class:`EventSerializationError`.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise EventSerializationError(f"{value!r} is not valid JSON")
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return duration_iso_string(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(v) for v in value), key=dumps)
    raise EventSerializationError(
        f"cannot convert {type(value).__name__} ({value!r:.60}) to JSON; convert it to a str/number first"
    )
