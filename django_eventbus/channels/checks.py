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
    "CHANNELS_RESUME_LIMIT",
)
#: Limits that may be fractions (seconds, frames per second).
_RATES = ("WEBSOCKET_REAUTHORIZE_SECONDS", "WEBSOCKET_SUBSCRIBE_RATE", "CHANNELS_RESUME_MAX_AGE")
#: Limits that ``None`` turns off.
_OPTIONAL = frozenset({"CHANNELS_RESUME_LIMIT", "CHANNELS_RESUME_MAX_AGE"})


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
        if value is None and key in _OPTIONAL:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            messages.append(
                Error(
                    f"EVENTBUS[{key!r}] must be a positive integer, got {value!r}.",
                    id="django_eventbus.E102",
                )
            )
    for key in _RATES:
        value = conf.get(key)
        if value is None and key in _OPTIONAL:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            messages.append(
                Error(
                    f"EVENTBUS[{key!r}] must be a positive number, got {value!r}.", id="django_eventbus.E102"
                ),
            )
    messages += _check_redis_channel_layer_timeouts()
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


def _check_redis_channel_layer_timeouts() -> list[CheckMessage]:
    """W102: the Channels tutorial's RedisChannelLayer with redis-py >= 8 kills idle websockets.

    redis-py 8 gives every connection a 5 s ``socket_timeout``; RedisChannelLayer's
    ``receive`` blocks in BZPOPMIN for 5 s, so a consumer with nothing to receive for
    that long dies with ``TimeoutError`` in ``await_many_dispatch``.
    """
    from django.conf import settings

    try:
        import redis
    except ImportError:
        return []
    if int(redis.__version__.split(".")[0]) < 8:
        return []
    messages: list[CheckMessage] = []
    layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    for alias, layer in layers.items():
        if not isinstance(layer, dict) or layer.get("BACKEND") != "channels_redis.core.RedisChannelLayer":
            continue
        hosts = (layer.get("CONFIG") or {}).get("hosts") or ["redis://localhost:6379"]
        if any(not isinstance(host, dict) or "socket_timeout" not in host for host in hosts):
            messages.append(
                Warning(
                    f"CHANNEL_LAYERS[{alias!r}] uses RedisChannelLayer with redis-py "
                    f"{redis.__version__} and no socket_timeout: its 5 s default ends every "
                    "websocket that receives nothing for 5 s (TimeoutError in await_many_dispatch).",
                    hint='Give each host {"address": "redis://…", "socket_timeout": None}, '
                    "or use channels_redis.pubsub.RedisPubSubChannelLayer.",
                    id="django_eventbus.W102",
                )
            )
    return messages
