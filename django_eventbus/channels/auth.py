"""Who may subscribe to what: deny by default, pluggable with ``EVENTBUS["WEBSOCKET_AUTHORIZE"]``.

The setting names a callable ``(user, topic) -> bool`` (a dotted path or the
callable itself). It is called from a worker thread (it may use the ORM):

* with a **topic**, for an exact subscription and for each topic a pattern
  subscription delivers (every event is checked before it is sent);
* with a **pattern** itself (``inventory:*``), among the candidates that decide
  whether a pattern subscription is accepted at all (see :func:`may_subscribe`).

:func:`default_authorize` allows every topic to users who may read the event log
in the admin (``django_eventbus.view_storedevent``: it shows every payload), a
model topic (``EVENTBUS["MODELS"]`` or ``@track``) to users with the ``view``
permission on that model, any other topic (or pattern) to active staff users,
and nothing to anonymous or inactive users.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.contrib.auth import get_permission_codename
from django.db import models
from django.utils.module_loading import import_string

from django_eventbus.conf import conf
from django_eventbus.events.topics import topic_matches

__all__ = ["Authorize", "default_authorize", "get_authorize", "may_see", "may_subscribe", "model_topics"]

Authorize = Callable[[Any, str], bool]

DEFAULT_AUTHORIZE = "django_eventbus.channels.auth.default_authorize"
EVENT_LOG_VIEW_PERMISSION = "django_eventbus.view_storedevent"


def model_topics() -> dict[str, list[type[models.Model]]]:
    """Topic -> the tracked models that publish on it."""
    from django_eventbus.capture.tracking import tracked_models

    found: dict[str, list[type[models.Model]]] = {}
    for tracking in tracked_models():
        found.setdefault(tracking.topic, []).append(tracking.model)
    return found


def default_authorize(user: Any, topic: str) -> bool:
    """Readers of the event log see all; model topics need the model's ``view`` permission; others staff."""
    if user is None or not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return False
    if user.has_perm(EVENT_LOG_VIEW_PERMISSION):
        # Whoever can read every payload in the admin's event log may follow it live too.
        return True
    models_ = model_topics().get(topic)
    if models_:
        return all(
            user.has_perm(f"{m._meta.app_label}.{get_permission_codename('view', m._meta)}") for m in models_
        )
    return bool(getattr(user, "is_staff", False))


@functools.lru_cache(maxsize=8)
def _load(path: str) -> Authorize:
    func = import_string(path)
    if not callable(func):
        raise TypeError(f"EVENTBUS['WEBSOCKET_AUTHORIZE'] = {path!r} is not callable")
    return func  # type: ignore[no-any-return]


def get_authorize() -> Authorize:
    """The configured authorization callable (read live, so ``override_settings`` works)."""
    value = conf.get("WEBSOCKET_AUTHORIZE")
    if callable(value):
        return value  # type: ignore[no-any-return]
    return _load(str(value))


def may_see(user: Any, topic: str) -> bool:
    """Whether ``user`` may receive events on ``topic`` (sync: may query the database)."""
    return bool(get_authorize()(user, topic))


def may_subscribe(user: Any, topic_or_pattern: str, is_pattern: bool) -> bool:
    """Whether a subscription is accepted.

    A topic: the callable decides. A pattern: accepted when the callable allows
    the pattern itself (for what it may match beyond the known topics) or at least
    one model topic the pattern matches; each event it delivers is then checked
    by topic, so a pattern never yields an event its topic would not allow.
    """
    authorize = get_authorize()
    if not is_pattern:
        return bool(authorize(user, topic_or_pattern))
    if authorize(user, topic_or_pattern):
        return True
    return any(authorize(user, topic) for topic in model_topics() if topic_matches(topic_or_pattern, topic))
