"""Framework-free event bus: events, subscriptions and backends (no Django import here).

Production backends are imported directly::

    from django_eventbus.events.postgres import PostgresEventBus
    from django_eventbus.events.redis import RedisEventBus
"""

from __future__ import annotations

from .base import BaseEventBus, ConnectionState
from .bus import EventBus, create_event_bus
from .dispatch import BusStats
from .errors import BackendNotInstalledError, BusClosedError, EventBusError, EventSerializationError
from .memory import InMemoryEventBus
from .types import Event, EventType, Subscription

__all__ = [
    "BackendNotInstalledError",
    "BaseEventBus",
    "BusClosedError",
    "BusStats",
    "ConnectionState",
    "Event",
    "EventBus",
    "EventBusError",
    "EventSerializationError",
    "EventType",
    "InMemoryEventBus",
    "Subscription",
    "create_event_bus",
]
