"""The app's own Django signals: hook into publishing and handling without subclassing.

Each is sent with ``sender`` = ``"django_eventbus"`` and keyword arguments:

``event_published``
    ``events`` (list of :class:`~django_eventbus.events.Event`), ``seconds`` (how long
    the hand-over to the transport took). Sent in the process that published, after
    the transport accepted the events.
``event_handled``
    ``consumer`` (its name), ``event``, ``seconds`` (the handler's run time). Sent by
    ``eventbus_listen`` after a consumer's handler returned.
``event_failed``
    ``consumer``, ``event``, ``error`` (the exception), ``attempts`` (so far),
    ``dead_lettered`` (True when the retries are spent and a dead letter was written).

Receivers run in the thread that sends (a web request's thread after commit, the
listener's loop thread through ``sync_to_async``): keep them quick. A receiver that
raises is logged and never breaks publishing or handling (``send_robust``).
The Prometheus exporter (:mod:`django_eventbus.metrics.prometheus`) and the
OpenTelemetry spans (:mod:`django_eventbus.tracing`) are built on these hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.dispatch import Signal

from .events import Event

__all__ = ["event_failed", "event_handled", "event_published"]

logger = logging.getLogger("django_eventbus")

SENDER = "django_eventbus"

event_published = Signal()
event_handled = Signal()
event_failed = Signal()


def _send(signal: Signal, **kwargs: Any) -> None:
    if not signal.has_listeners(SENDER):
        return  # the common case costs one check
    for receiver, result in signal.send_robust(SENDER, **kwargs):
        if isinstance(result, Exception):
            logger.error("django_eventbus signal receiver %r raised", receiver, exc_info=result)


def published(events: Sequence[Event], seconds: float) -> None:
    _send(event_published, events=list(events), seconds=seconds)


def handled(consumer: str, event: Event, seconds: float) -> None:
    _send(event_handled, consumer=consumer, event=event, seconds=seconds)


def failed(consumer: str, event: Event, error: BaseException, attempts: int, dead_lettered: bool) -> None:
    _send(
        event_failed,
        consumer=consumer,
        event=event,
        error=error,
        attempts=attempts,
        dead_lettered=dead_lettered,
    )
