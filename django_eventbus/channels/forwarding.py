"""Sending events to Channels groups (``group_send``), from whichever loop the forwarder runs on.

:func:`forward` is the handler of the durable consumer ``django_eventbus.channels``
(pattern ``*``), so it runs where consumers run: in ``manage.py eventbus_listen``,
or with the memory bus on the web process's bus thread. Each event becomes one
message, sent to every group of :func:`~.groups.groups_for_topic`::

    {"type": "eventbus.event", "event": event.to_dict()}

Resuming
--------
Like every durable consumer the forwarder has a cursor: a restarted or redeployed
listener forwards, in log order, what was committed while it was away, so a
browser that stayed connected misses nothing. A resumed forwarder may send again
the event that was in flight when it stopped; the websocket consumer drops an
event id it already sent. After a long outage the replay is bounded
(:func:`skip_backlog`): past ``CHANNELS_RESUME_LIMIT`` events or
``CHANNELS_RESUME_MAX_AGE`` seconds the forwarder skips to the end of the log,
logs a warning, and browsers reload through ``since`` when they reconnect.

Event loops
-----------
channels-redis layers keep one connection pool per event loop, so calling
``group_send`` from the forwarder's own loop is safe. ``InMemoryChannelLayer`` is
not: its queues belong to the ASGI server's loop, and completing their futures
from another thread corrupts them (a waiting consumer is not woken). So the
websocket consumer records the server's loop when a client connects
(:func:`note_server_loop`) and, for an in-memory layer, ``group_send`` is run on
that loop with ``run_coroutine_threadsafe``. No loop recorded means no websocket
ever connected in this process: nobody to send to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string

from django_eventbus.conf import conf
from django_eventbus.events import Event

from . import MESSAGE_TYPE
from .groups import groups_for_topic

__all__ = [
    "MESSAGE_TYPE",
    "event_message",
    "forward",
    "note_server_loop",
    "send_to_groups",
    "skip_backlog",
    "uses_in_memory_layer",
]

logger = logging.getLogger("django_eventbus.channels")

#: How long the forwarder waits for the server loop to run an in-memory ``group_send``.
BRIDGE_TIMEOUT = 5.0

_server_loop: asyncio.AbstractEventLoop | None = None


def note_server_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Remember the loop of the ASGI server (called by the websocket consumer on connect)."""
    global _server_loop
    _server_loop = loop


def event_message(event: Event) -> dict[str, Any]:
    """The channel-layer message of one event."""
    return {"type": MESSAGE_TYPE, "event": event.to_dict()}


def uses_in_memory_layer(alias: str = "default") -> bool:
    """Whether the channel layer ``alias`` is (a subclass of) ``InMemoryChannelLayer``.

    Read from the setting rather than from the layer instance, so that asking does
    not create the layer on the wrong thread.
    """
    from channels.layers import InMemoryChannelLayer

    config = getattr(settings, "CHANNEL_LAYERS", {}).get(alias)
    if not config:
        return False
    try:
        backend = import_string(config["BACKEND"])
    except (ImportError, KeyError):
        return False  # reported by channels itself when the layer is first used
    return isinstance(backend, type) and issubclass(backend, InMemoryChannelLayer)


async def forward(event: Event, layer: Any = None) -> None:
    """Send ``event`` to its groups on the channel layer (``layer``, default: the default layer).

    A no-op when ``EVENTBUS["CHANNELS"]`` is off or no channel layer is configured.
    Raises what the layer raises (the consumer runner logs and retries).
    """
    if not conf.get("CHANNELS"):
        return
    await send_to_groups(groups_for_topic(event.topic), event_message(event), layer)


def skip_backlog(position: int, handled: int) -> bool:
    """Whether the forwarder should skip what the log holds after ``position`` rather than replay it.

    Yes when more than ``CHANNELS_RESUME_LIMIT`` events are waiting, or the oldest
    waiting one is older than ``CHANNELS_RESUME_MAX_AGE`` seconds: a browser is better
    served by reloading its data than by a flood of stale events (``None`` turns a
    limit off). ``handled`` events above ``position`` were already forwarded (live,
    past a gap) and do not count. Two index range reads of the log's primary key.
    """
    from django_eventbus.models import StoredEvent

    limit = conf.get("CHANNELS_RESUME_LIMIT")
    max_age = conf.get("CHANNELS_RESUME_MAX_AGE")
    waiting = StoredEvent.objects.filter(id__gt=position).order_by("id")
    if max_age is not None:
        oldest = waiting.values_list("timestamp", flat=True).first()
        if oldest is None:
            return False
        if oldest < datetime.now(timezone.utc) - timedelta(seconds=float(max_age)):
            logger.warning(
                "the Channels forwarder is more than %ss behind (oldest waiting event: %s): "
                "skipping to the end of the log",
                max_age,
                oldest.isoformat(),
            )
            return True
    if limit is not None:
        beyond = int(limit) + handled
        if waiting.values_list("id", flat=True)[beyond : beyond + 1].exists():
            logger.warning(
                "the Channels forwarder is more than %d events behind: skipping to the end of the log",
                int(limit),
            )
            return True
    return False


async def send_to_groups(groups: tuple[str, ...], message: dict[str, Any], layer: Any = None) -> None:
    """``group_send`` of ``message`` to ``groups`` on ``layer`` (default: the default layer),
    bridged to the server loop for an in-memory layer (see the module docstring)."""
    if layer is None and uses_in_memory_layer():
        await _forward_in_memory(groups, message)
        return
    if layer is None:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return
    await _group_send(layer, groups, message)


async def _group_send(layer: Any, groups: Iterable[str], message: dict[str, Any]) -> None:
    # Concurrently: with channels-redis each group_send is a round trip. The event is
    # handed to the next call only when all its groups have it, so order is kept per group.
    await asyncio.gather(*(layer.group_send(group, message) for group in groups))


async def _send_on_server_loop(groups: tuple[str, ...], message: dict[str, Any]) -> None:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is not None:
        await _group_send(layer, groups, message)


async def _forward_in_memory(groups: tuple[str, ...], message: dict[str, Any]) -> None:
    loop = _server_loop
    if loop is None or loop.is_closed() or not loop.is_running():
        return  # no websocket consumer lives in this process (any more)
    if loop is asyncio.get_running_loop():
        await _send_on_server_loop(groups, message)
        return
    coroutine = _send_on_server_loop(groups, message)
    try:
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    except RuntimeError:  # the loop closed between the check and the call
        coroutine.close()
        return
    try:
        await asyncio.wait_for(asyncio.wrap_future(future), BRIDGE_TIMEOUT)
    except asyncio.TimeoutError:
        # A server loop that does not run for seconds has bigger problems; retrying
        # would only pile up more work on it.
        event = message.get("event")
        logger.warning(
            "the ASGI server loop did not take %s within %.0fs: not forwarded",
            f"event {event['event_id']}" if isinstance(event, dict) else f"a {message['type']} message",
            BRIDGE_TIMEOUT,
        )
