"""System checks of the Channels integration (registered by :func:`django_eventbus.channels.setup`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core.checks import CheckMessage, Error, Warning

from django_eventbus.conf import conf

__all__ = ["check_channels"]

_LIMITS = (
    "WEBSOCKET_MAX_SUBSCRIPTIONS",
    "WEBSOCKET_MAX_TOPIC_LENGTH",
    "WEBSOCKET_MAX_FRAME_BYTES",
    "WEBSOCKET_REPLAY_LIMIT",
    "WEBSOCKET_REPLAY_SCAN_LIMIT",
    "WEBSOCKET_MAX_CONNECTIONS_PER_USER",
    "WEBSOCKET_MAX_CONNECTIONS_PER_ADDRESS",
)
#: Limits that may be fractions (seconds, frames per second).
_RATES = ("WEBSOCKET_REAUTHORIZE_SECONDS", "WEBSOCKET_SUBSCRIBE_RATE")


def check_channels(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    authorize = conf.get("WEBSOCKET_AUTHORIZE")
    if not callable(authorize):
        from .auth import _load

        try:
            _load(str(authorize))
        except (ImportError, TypeError) as exc:
            messages.append(
                Error(
                    f"EVENTBUS['WEBSOCKET_AUTHORIZE'] = {authorize!r} cannot be used: {exc}",
                    hint="Name a callable (user, topic) -> bool by its dotted path.",
                    id="django_eventbus.E101",
                )
            )
    for key in _LIMITS:
        value = conf.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            messages.append(
                Error(
                    f"EVENTBUS[{key!r}] must be a positive integer, got {value!r}.",
                    id="django_eventbus.E102",
                )
            )
    for key in _RATES:
        value = conf.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            messages.append(
                Error(
                    f"EVENTBUS[{key!r}] must be a positive number, got {value!r}.", id="django_eventbus.E102"
                ),
            )
    from . import enabled

    if not enabled():
        return messages
    from .forwarding import uses_in_memory_layer

    try:
        backend = conf.raw_bus_config().get("backend")
    except (ValueError, TypeError):
        return messages  # the bus setting has its own check
    if uses_in_memory_layer() and backend != "memory":
        messages.append(
            Warning(
                "InMemoryChannelLayer with a non-memory event bus: events are forwarded to the "
                "channel layer by `manage.py eventbus_listen`, another process, so websockets "
                "served by the web processes receive nothing.",
                hint="Use channels_redis.pubsub.RedisPubSubChannelLayer (or RedisChannelLayer).",
                id="django_eventbus.W101",
            )
        )
    return messages
