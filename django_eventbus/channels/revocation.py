"""Closing a user's websockets when the user logs out or is deactivated.

Every socket of an authenticated user joins the user's group
(:func:`~.groups.user_group`). On ``user_logged_out``, and after the commit of a
save that leaves a user inactive, one ``{"type": "eventbus.revoke"}`` message is
sent to that group through the channel layer, so the sockets close in every server
process that holds one (with channels-redis; an in-memory layer only reaches its
own process). The consumer answers it with a ``revoked`` error frame and closes
with code :data:`~.consumer.CLOSE_REVOKED`.

What this does not see (``QuerySet.update(is_active=False)``, a permission taken
away, a session deleted in the database) is caught by the periodic
re-authorization of ``EVENTBUS["WEBSOCKET_REAUTHORIZE_SECONDS"]``.

Receivers are connected by :func:`connect_receivers` (from
:func:`django_eventbus.channels.setup`); Channels is imported only when one fires.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_save

from .groups import user_group

__all__ = ["REVOKE_MESSAGE_TYPE", "connect_receivers", "revoke_user"]

logger = logging.getLogger("django_eventbus.channels")

#: The ``type`` of the channel-layer message that closes a user's sockets.
REVOKE_MESSAGE_TYPE = "eventbus.revoke"


def revoke_user(pk: Any, reason: str) -> None:
    """Close every websocket of the user ``pk`` in every server process (sync code).

    Never raises: a channel layer that is down must not fail the logout or the save
    that asked for it. The sockets then lose their subscriptions at the next
    re-authorization instead.
    """
    from . import enabled

    if pk is None or not enabled():
        return
    from asgiref.sync import async_to_sync

    from .forwarding import send_to_groups

    message = {"type": REVOKE_MESSAGE_TYPE, "reason": reason}
    try:
        async_to_sync(send_to_groups)((user_group(pk),), message)
    except Exception:  # any layer failure: logged, the periodic re-authorization remains
        logger.exception("could not close the websockets of user %s (%s)", pk, reason)


def _on_logged_out(sender: Any, request: Any = None, user: Any = None, **kwargs: Any) -> None:
    if user is not None:
        revoke_user(user.pk, "logged out")


def _on_user_saved(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    # A save cannot tell whether the user was active before without another query: closing
    # the (normally absent) sockets of an already inactive user costs one group_send.
    if created or getattr(instance, "is_active", True):
        return
    pk = instance.pk
    transaction.on_commit(lambda: revoke_user(pk, "deactivated"))


def connect_receivers() -> None:
    """Connect the logout and deactivation receivers (idempotent)."""
    user_logged_out.connect(_on_logged_out, dispatch_uid="django_eventbus.channels.logout")
    post_save.connect(
        _on_user_saved, sender=settings.AUTH_USER_MODEL, dispatch_uid="django_eventbus.channels.deactivate"
    )
