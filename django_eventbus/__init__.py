"""django-eventbus: committed model changes as events, delivered everywhere they are needed.

The Django-level API is imported lazily (``django_eventbus.publish`` etc.), so
``import django_eventbus.events`` works without Django configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "publish": "django_eventbus.publishing",
    "apublish": "django_eventbus.publishing",
    "make_event": "django_eventbus.publishing",
    "track": "django_eventbus.tracking",
    "emit_model_events": "django_eventbus.tracking",
    "get_bus": "django_eventbus.runtime",
    "aget_bus": "django_eventbus.runtime",
    "correlation": "django_eventbus.context",
    "consumer": "django_eventbus.consumers",
    "celery_route": "django_eventbus.consumers",
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
    from .consumers import celery_route, consumer
    from .context import correlation
    from .events import Event, EventType
    from .publishing import apublish, make_event, publish
    from .runtime import aget_bus, get_bus
    from .tracking import emit_model_events, track


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'django_eventbus' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
