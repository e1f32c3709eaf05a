"""django-eventbus: committed model changes as events, delivered everywhere they are needed.

The Django-level API is imported lazily (``django_eventbus.publish`` etc.), so
``import django_eventbus.events`` works without Django configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "publish": "django_eventbus.capture.publishing",
    "apublish": "django_eventbus.capture.publishing",
    "make_event": "django_eventbus.capture.publishing",
    "track": "django_eventbus.capture.tracking",
    "emit_model_events": "django_eventbus.capture.tracking",
    "get_bus": "django_eventbus.delivery.runtime",
    "aget_bus": "django_eventbus.delivery.runtime",
    "correlation": "django_eventbus.capture.context",
    "consumer": "django_eventbus.delivery.consumers",
    "celery_route": "django_eventbus.delivery.consumers",
    "Event": "django_eventbus.events",
    "EventType": "django_eventbus.events",
}

__all__ = [
    "Event",
    "EventType",
    "aget_bus",
    "apublish",
    "celery_route",
    "consumer",
    "correlation",
    "emit_model_events",
    "get_bus",
    "make_event",
    "publish",
    "track",
]

if TYPE_CHECKING:
    from .capture.context import correlation
    from .capture.publishing import apublish, make_event, publish
    from .capture.tracking import emit_model_events, track
    from .delivery.consumers import celery_route, consumer
    from .delivery.runtime import aget_bus, get_bus
    from .events import Event, EventType


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'django_eventbus' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
