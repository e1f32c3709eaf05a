"""Events to Channels groups, and through a websocket consumer to browsers.

Wiring: :func:`setup` (called by the app's ``ready()``) registers the durable
consumer ``django_eventbus.channels`` (pattern ``*``) when a channel layer is
configured (``CHANNEL_LAYERS``) and ``EVENTBUS["CHANNELS"]`` is on (the default).
Like every consumer it runs in exactly one process: ``manage.py eventbus_listen``
(resuming from its cursor after a restart, see :mod:`.forwarding`), or with the
memory bus the web process itself. It sends each event, as
``{"type": "eventbus.event", "event": event.to_dict()}``, to the groups of
:func:`groups_for_topic` (see :mod:`django_eventbus.channels.groups`).

Receiving events in a consumer of your own::

    from django_eventbus.channels import group_name, subscription_group

    class StockConsumer(AsyncJsonWebsocketConsumer):
        async def connect(self):
            await self.channel_layer.group_add(group_name("inventory:product"), self.channel_name)
            await self.channel_layer.group_add(subscription_group("billing:*"), self.channel_name)
            await self.accept()

        async def eventbus_event(self, message):   # type "eventbus.event"
            await self.send_json(message["event"])  # Event.to_dict(); Event.from_dict() rebuilds it

This module imports nothing from Channels: :func:`setup` stays cheap, and works
(doing nothing) when Channels is not installed.
"""

from __future__ import annotations

import importlib.util

from django_eventbus.events import Event

from .groups import ALL_GROUP, group_name, groups_for_topic, prefix_group_name, subscription_group, user_group

__all__ = [
    "ALL_GROUP",
    "CONSUMER_NAME",
    "MESSAGE_TYPE",
    "enabled",
    "group_name",
    "groups_for_topic",
    "prefix_group_name",
    "setup",
    "subscription_group",
    "user_group",
]

#: Name of the registered forwarding consumer.
CONSUMER_NAME = "django_eventbus.channels"
#: The ``type`` of the channel-layer messages (handled by a consumer's ``eventbus_event``).
MESSAGE_TYPE = "eventbus.event"


def enabled() -> bool:
    """Whether events are forwarded: Channels installed, a layer configured, ``EVENTBUS["CHANNELS"]`` on."""
    from django.conf import settings

    from django_eventbus.conf import conf

    return (
        bool(conf.get("CHANNELS"))
        and bool(getattr(settings, "CHANNEL_LAYERS", None))
        and importlib.util.find_spec("channels") is not None
    )


async def _forward(event: Event) -> None:
    # Imported on first use: setup() must not import Channels.
    from .forwarding import forward

    await forward(event)


def _skip_backlog(position: int, handled: int) -> bool:
    from .forwarding import skip_backlog

    return skip_backlog(position, handled)


#: Cursor saves per forwarded events during catch-up. A crash re-sends at most this many
#: events, which the websocket consumer drops (it remembers the last RECENT_IDS = 2048
#: ids per socket), so the replay after a restart need not write the cursor per event.
CHECKPOINT_EVERY = 100


def setup() -> None:
    """Register (or unregister) the forwarding consumer and the checks; idempotent.

    Run again when ``EVENTBUS`` or ``CHANNEL_LAYERS`` changes (the app's ``setting_changed`` receiver).
    """
    from django.core import checks

    from django_eventbus.conf import conf
    from django_eventbus.delivery.consumers import Consumer, register, unregister

    from .checks import check_channels
    from .revocation import connect_receivers

    checks.register(check_channels, checks.Tags.compatibility)
    connect_receivers()
    if enabled():
        register(
            Consumer(
                name=CONSUMER_NAME,
                pattern="*",
                func=_forward,
                # Without the log there is nothing to resume from: non-durable, as W003 asks.
                durable=conf.STORE_EVENTS,
                checkpoint_every=CHECKPOINT_EVERY,
                skip_backlog=_skip_backlog,
            )
        )
    else:
        unregister(CONSUMER_NAME)
