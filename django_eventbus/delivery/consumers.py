"""Registered consumers: functions that handle events, by topic or fnmatch pattern.

    from django_eventbus import consumer

    @consumer("inventory:*")
    async def reindex(event): ...

Modules named ``event_consumers`` (``EVENTBUS["CONSUMERS_MODULE"]``) in every
installed app are imported in ``ready()``, so decorating is enough. Consumers
run in ``manage.py eventbus_listen`` (or, with the memory bus, in the web
process itself). A *durable* consumer (the default) has a cursor in the
database and catches up from the event log: it handles each committed event
once even across restarts and lost connections.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from django_eventbus.events.topics import is_pattern, topic_matches
from django_eventbus.events.types import Event

__all__ = ["Consumer", "celery_route", "consumer", "get_consumers", "register", "unregister"]

logger = logging.getLogger("django_eventbus")

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Consumer:
    """A named handler of the events whose topic matches ``pattern``."""

    name: str
    pattern: str
    func: Callable[[Event], Any]
    durable: bool = True
    #: attempts after the first failure before the event goes to the dead letters
    retries: int = 3
    #: seconds before the first retry (doubling, with jitter)
    retry_delay: float = 0.2
    #: during catch-up, save the cursor after this many handled events or ``checkpoint_interval``
    #: seconds, whichever comes first (a crash in catch-up may repeat that many); live events
    #: save it after each one
    checkpoint_every: int = 1000
    checkpoint_interval: float = 1.0
    #: sync handlers only: the handler's database writes and the cursor update commit in one
    #: transaction, so even a crash repeats nothing
    atomic: bool = False
    #: ``(position, handled) -> bool``, asked (in a thread; it may query the log) before each
    #: catch-up: True skips the backlog and moves the cursor to the end of the log, as for a
    #: new consumer. For consumers that would rather lose a long backlog than replay it (the
    #: Channels forwarder: browsers reload instead). ``handled``: events above ``position``
    #: already handled (live events past a gap).
    skip_backlog: Callable[[int, int], bool] | None = None
    #: split the consumer in this many partitions, each with its own cursor and lease, so
    #: up to that many listener processes share its events (:mod:`.partitions`)
    partitions: int = 1
    #: ``event -> key`` choosing the partition (default: the row — topic and pk — of model
    #: events, else the topic); events of one key are handled in commit order
    key: Callable[[Event], Any] | None = None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    @property
    def is_pattern(self) -> bool:
        return is_pattern(self.pattern)

    def matches(self, topic: str) -> bool:
        return topic_matches(self.pattern, topic) if self.is_pattern else topic == self.pattern


_registry: dict[str, Consumer] = {}


def register(item: Consumer) -> Consumer:
    """Add (or replace, by name) a consumer."""
    if item.retries < 0:
        raise ValueError("retries must be >= 0")
    if item.checkpoint_every < 1:
        raise ValueError("checkpoint_every must be >= 1")
    if item.checkpoint_interval < 0:
        raise ValueError("checkpoint_interval must be >= 0")
    if item.partitions < 1:
        raise ValueError(f"consumer {item.name}: partitions must be >= 1")
    if item.partitions > 1 and not item.durable:
        raise ValueError(
            f"consumer {item.name}: partitions need a durable consumer "
            "(each partition has a cursor and a lease)"
        )
    if item.key is not None and not callable(item.key):
        raise ValueError(f"consumer {item.name}: key must be a callable event -> key")
    if item.atomic and (item.is_async or not item.durable):
        raise ValueError(
            f"consumer {item.name}: atomic=True needs a durable consumer with a sync handler "
            "(its database writes and the cursor commit in one transaction of its thread)"
        )
    _registry[item.name] = item
    return item


def unregister(name: str) -> None:
    _registry.pop(name, None)


def get_consumers() -> list[Consumer]:
    return list(_registry.values())


def consumer(
    pattern: str,
    *,
    name: str | None = None,
    durable: bool = True,
    retries: int = 3,
    retry_delay: float = 0.2,
    checkpoint_every: int = 1000,
    checkpoint_interval: float = 1.0,
    atomic: bool = False,
    partitions: int = 1,
    key: Callable[[Event], Any] | None = None,
) -> Callable[[F], F]:
    """Decorator: run ``func(event)`` (sync or async) for every event on ``pattern``.

    ``pattern`` is a topic (``"inventory:product"``) or an fnmatch pattern
    (``"inventory:*"``). ``name`` (default: the function's dotted path) keys the
    durable cursor, so keep it stable across deploys. A raising call is retried
    ``retries`` times, then recorded as a dead letter (see the admin) and the
    consumer moves on. The cursor is saved after every live event, and during catch-up
    every ``checkpoint_every`` events or ``checkpoint_interval`` seconds (a crash in
    catch-up may repeat up to that many). ``atomic=True`` (sync handlers) commits the
    handler's database writes and the cursor update together: a crash repeats nothing.
    ``partitions=N`` splits the consumer by ``key`` (default: the row of model events, else the
    topic) so that up to N listener processes share it, each key's events in commit order
    (docs/consumers.md, "Scaling out").
    """

    def decorate(func: F) -> F:
        register(
            Consumer(
                name=name or f"{func.__module__}.{func.__qualname__}",
                pattern=pattern,
                func=func,
                durable=durable,
                retries=retries,
                retry_delay=retry_delay,
                checkpoint_every=checkpoint_every,
                checkpoint_interval=checkpoint_interval,
                atomic=atomic,
                partitions=partitions,
                key=key,
            )
        )
        return func

    return decorate


def celery_route(pattern: str, task: Any, *, name: str | None = None, **options: Any) -> Consumer:
    """Send every event on ``pattern`` to a Celery task, as ``task.apply_async((event.to_dict(),))``.

    The consumer is durable, so each committed event is enqueued once (at least once
    across a crash mid-send); the task runs on Celery workers, with Celery's retries.
    ``options`` go to ``apply_async`` (queue, countdown…). ``task`` may be a dotted path.
    """
    label = task if isinstance(task, str) else getattr(task, "name", repr(task))

    def send(event: Event) -> None:
        resolved = _resolve_task(task)
        resolved.apply_async((event.to_dict(),), **options)

    return register(Consumer(name=name or f"celery:{label}", pattern=pattern, func=send, retries=3))


def _resolve_task(task: Any) -> Any:
    if isinstance(task, str):
        from django.utils.module_loading import import_string

        return import_string(task)
    return task


def register_celery_routes() -> None:
    """Register ``EVENTBUS["CELERY_ROUTES"]`` (``{"pattern": "dotted.task.path"}``) as consumers."""
    from django_eventbus.conf import conf

    for name in [n for n, c in _registry.items() if getattr(c.func, "_eventbus_setting_route", False)]:
        unregister(name)
    for pattern, task in (conf.get("CELERY_ROUTES") or {}).items():
        route = celery_route(pattern, task, name=f"celery:{task}:{pattern}")
        route.func._eventbus_setting_route = True  # type: ignore[attr-defined]
