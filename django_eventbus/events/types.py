"""The value types of the bus: :class:`EventType`, :class:`Event`, :class:`Subscription`."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from enum import Enum
from typing import Any, NoReturn

__all__ = ["Event", "EventType", "FrozenDict", "FrozenList", "Subscription", "freeze"]

#: ``"v"`` of every event dict on the wire (docs/wire-format.md).
SCHEMA_VERSION = 1


class EventType(str, Enum):
    """Category of an event; ``.value`` is the lower-case name that goes on the wire."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    ACTIVATED = "activated"
    DEACTIVATED = "deactivated"
    ERROR = "error"
    CUSTOM = "custom"


def _immutable(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(f"{type(self).__name__} is read-only: events are immutable; copy it with dict()/list()")


class FrozenDict(dict[str, Any]):
    """A ``dict`` that refuses mutation.

    A ``dict`` subclass (not a ``MappingProxyType``) so that ``json.dumps``,
    ``==`` against plain dicts and ``isinstance(x, dict)`` keep working.
    """

    __slots__ = ()
    __setitem__ = __delitem__ = _immutable
    clear = pop = popitem = setdefault = update = __ior__ = _immutable

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: Any) -> FrozenDict:
        return self

    def __reduce__(self) -> Any:
        return (FrozenDict, (dict(self),))


class FrozenList(list[Any]):
    """A ``list`` that refuses mutation (compares equal to plain lists, unlike a tuple)."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _immutable
    append = extend = insert = pop = remove = clear = sort = reverse = _immutable

    def __copy__(self) -> FrozenList:
        return self

    def __deepcopy__(self, memo: Any) -> FrozenList:
        return self

    def __reduce__(self) -> Any:
        return (FrozenList, (list(self),))


def freeze(value: Any) -> Any:
    """Return a deep, read-only copy of JSON-like data (dicts and lists; leaves untouched)."""
    return _freeze(value, [])


_FINITE_LIMIT = float("inf")


def _freeze(value: Any, bad: list[bool]) -> Any:
    # One walk copies; it only *notes* that something is not JSON (exact types first:
    # this runs for every event received, and ABC isinstance checks are slow). The
    # message saying what and where is built by _json_problems, only when needed.
    cls = type(value)
    if cls is str or cls is int or cls is bool or value is None:
        return value
    if cls is dict or cls is FrozenDict:
        items = []
        for key, item in value.items():
            if type(key) is not str:
                bad.append(True)
            items.append((key, _freeze(item, bad)))
        # dict.__init__ bypasses the overridden __setitem__, so this builds the frozen copy.
        return FrozenDict(items)
    if cls is list or cls is FrozenList or cls is tuple:
        return FrozenList([_freeze(item, bad) for item in value])
    if cls is float:
        if value != value or value == _FINITE_LIMIT or value == -_FINITE_LIMIT:
            bad.append(True)
        return value
    # Subclasses and other mappings/sequences: the general (slower) checks.
    if isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (_FINITE_LIMIT, -_FINITE_LIMIT):
            bad.append(True)
        return value
    if isinstance(value, Mapping):
        return _freeze(dict(value), bad)
    if isinstance(value, (list, tuple)):
        return _freeze(list(value), bad)
    bad.append(True)
    return value


def _json_problems(value: Any, path: str, problems: list[str]) -> None:
    """Say what in ``value`` JSON cannot carry faithfully, and where."""
    if isinstance(value, (str, int)) or value is None:
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            problems.append(f"{path or 'value'} is {value!r}, which is not valid JSON")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(
                    f"{path or 'value'} has the key {key!r} ({type(key).__name__}); JSON keys are strings"
                )
            _json_problems(item, f"{path}[{key!r}]", problems)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _json_problems(item, f"{path}[{i}]", problems)
        return
    problems.append(
        f"{path or 'value'} is a {type(value).__name__} ({value!r:.60}), which JSON cannot carry; "
        "convert it first (django_eventbus.events.codec.to_jsonable does the usual types)"
    )


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return str(uuid.uuid4())


@dataclasses.dataclass(frozen=True, eq=True)
class Event:
    """An immutable message published to a topic.

    ``payload`` and ``metadata`` are deep-copied into read-only containers on
    construction, so an event never shares a mutable dict with its creator or
    with a copy made by :meth:`with_correlation` or :func:`dataclasses.replace`.
    """

    type: EventType
    topic: str
    payload: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timestamp: datetime = dataclasses.field(default_factory=_utcnow)
    event_id: str = dataclasses.field(default_factory=_new_id)
    source: str | None = None
    correlation_id: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Why payload/metadata are not JSON-safe, if they are not (checked once, raised at publish).
    json_problem: str | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # object.__setattr__ is the documented way to normalise fields of a frozen dataclass.
        # Annotations do not stop a caller passing "created" or a non-string topic: check at runtime.
        type_: object = self.type
        if not isinstance(type_, EventType):
            object.__setattr__(self, "type", EventType(type_))
        topic: object = self.topic
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"Event.topic must be a non-empty string, got {self.topic!r}")
        if not isinstance(self.payload, Mapping):
            raise TypeError(f"Event.payload must be a dict, got {type(self.payload).__name__}")
        if not isinstance(self.metadata, Mapping):
            raise TypeError(f"Event.metadata must be a dict, got {type(self.metadata).__name__}")
        bad: list[bool] = []
        payload, metadata = self.payload, self.metadata
        object.__setattr__(self, "payload", _freeze(payload, bad))
        object.__setattr__(self, "metadata", _freeze(metadata, bad))
        if bad:
            problems: list[str] = []
            _json_problems(payload, "payload", problems)
            _json_problems(metadata, "metadata", problems)
            object.__setattr__(self, "json_problem", "; ".join(problems[:3]))
        if self.timestamp.tzinfo is None:
            # A naive timestamp is taken as UTC so every event compares and serialises alike.
            object.__setattr__(self, "timestamp", self.timestamp.replace(tzinfo=timezone.utc))
        object.__setattr__(self, "event_id", str(self.event_id))

    def __hash__(self) -> int:
        # event_id identifies an event; the payload dicts are not hashable.
        return hash(self.event_id)

    @property
    def id(self) -> str:
        """Alias of :attr:`event_id` (the guide's error-handler sample reads ``event.id``)."""
        return self.event_id

    def with_correlation(self, correlation_id: str | None) -> Event:
        """Return a copy of this event with another ``correlation_id``."""
        return dataclasses.replace(self, correlation_id=correlation_id)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (timestamp as ISO 8601, type as its value).

        ``v`` is the schema version (docs/wire-format.md): it changes only when a key
        changes meaning or goes away; added keys keep it.
        """
        return {
            "v": SCHEMA_VERSION,
            "event_id": self.event_id,
            "type": self.type.value,
            "topic": self.topic,
            "payload": self.payload,
            "timestamp": self.timestamp.isoformat(),
            "source": self.source,
            "correlation_id": self.correlation_id,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Rebuild an event from :meth:`to_dict` output; ``ValueError`` on malformed input.

        A dict without ``v`` is version 1 (what was sent before the key existed); a
        version this code does not know is refused rather than misread.
        """
        if data.get("v", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"not a valid event: unsupported schema version v={data.get('v')!r}")
        try:
            timestamp = data.get("timestamp")
            kwargs: dict[str, Any] = {
                "type": EventType(data["type"]),
                "topic": data["topic"],
                "payload": data.get("payload") or {},
                "source": data.get("source"),
                "correlation_id": data.get("correlation_id"),
                "metadata": data.get("metadata") or {},
            }
            if timestamp is not None:
                kwargs["timestamp"] = (
                    timestamp if isinstance(timestamp, datetime) else datetime.fromisoformat(timestamp)
                )
            if data.get("event_id") is not None:
                kwargs["event_id"] = data["event_id"]
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a valid event: {exc!r}") from exc


Handler = Callable[[Event], Any]
"""A subscriber: a sync or async callable taking one :class:`Event`."""


@dataclasses.dataclass(eq=False)
class Subscription:
    """An active subscription; ``await subscription.cancel()`` ends it (idempotent)."""

    topic: str
    pattern: str | None = None
    subscription_id: str = dataclasses.field(default_factory=_new_id)
    created_at: datetime = dataclasses.field(default_factory=_utcnow)
    #: The function events are delivered to (the seed library's ``Subscription`` has it too).
    handler: Handler | None = dataclasses.field(default=None, repr=False, compare=False)
    _on_cancel: Callable[[Subscription], Awaitable[None]] | None = dataclasses.field(default=None, repr=False)
    _cancelled: bool = dataclasses.field(default=False, repr=False)

    @property
    def active(self) -> bool:
        return not self._cancelled

    async def cancel(self) -> None:
        """Stop delivery to this subscription. Calling it again does nothing."""
        if self._cancelled:
            return
        self._cancelled = True
        if self._on_cancel is not None:
            await self._on_cancel(self)
