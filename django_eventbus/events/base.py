"""What every backend shares: validation, the subscription table, state and callbacks.

A backend subclasses :class:`BaseEventBus` and implements the transport
hooks (``_connect``, ``_close``, ``_send``, ``_listen``, ``_unlisten``); the
public ``publish``/``subscribe`` contract is enforced here, once.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .codec import check_event
from .dispatch import BusStats, Delivery, SubscriptionTable
from .errors import BusClosedError
from .types import Event, Handler, Subscription

__all__ = ["BaseEventBus", "ConnectionState"]

logger = logging.getLogger("django_eventbus.events")

StateCallback = Callable[[], Any]


class ConnectionState(str, enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


class BaseEventBus:
    """Shared implementation of the :class:`~django_eventbus.events.EventBus` protocol."""

    backend_name = "base"
    #: Per-subscription queue length; ``None`` runs handlers inline in ``publish``.
    queue_size: int | None = None

    def __init__(self) -> None:
        self._table = SubscriptionTable()
        self.stats = BusStats()
        self._state = ConnectionState.NEW
        self._on_lost: list[StateCallback] = []
        self._on_restored: list[StateCallback] = []
        self._listening: dict[tuple[str, str], asyncio.Future[None]] = {}

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is ConnectionState.CONNECTED

    @property
    def is_connected(self) -> bool:
        """True while the transport is open (the seed library's name; same as :attr:`connected`)."""
        return self._state is ConnectionState.CONNECTED

    @property
    def _connected(self) -> bool:
        # Kept for code written against the seed library, which read this attribute.
        return self.is_connected

    @property
    def subscription_count(self) -> int:
        """How many subscriptions are active on this bus."""
        return len(self._table)

    def on_connection_lost(self, callback: StateCallback) -> Callable[[], None]:
        """Call ``callback()`` (sync or async) when the transport drops; returns an unregister function."""
        self._on_lost.append(callback)
        return lambda: self._on_lost.remove(callback) if callback in self._on_lost else None

    def on_connection_restored(self, callback: StateCallback) -> Callable[[], None]:
        """Call ``callback()`` after a reconnect, once subscriptions are back.

        Events published while the connection was down did not reach this process:
        this is the signal to resynchronise (the Django layer catches up from its log).
        """
        self._on_restored.append(callback)
        return lambda: self._on_restored.remove(callback) if callback in self._on_restored else None

    async def _set_state(self, state: ConnectionState) -> None:
        previous, self._state = self._state, state
        if state is ConnectionState.RECONNECTING and previous is ConnectionState.CONNECTED:
            await self._fire(self._on_lost, "connection lost")
        elif state is ConnectionState.CONNECTED and previous is ConnectionState.RECONNECTING:
            self.stats.reconnects += 1
            await self._fire(self._on_restored, "connection restored")

    async def _fire(self, callbacks: Iterable[StateCallback], what: str) -> None:
        logger.warning("%s event bus: %s", self.backend_name, what)
        for callback in list(callbacks):
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("%s callback %r failed", what, callback)

    # -- lifecycle ---------------------------------------------------------

    async def connect(self) -> None:
        """Open the transport. Subscriptions made before ``connect`` start now."""
        if self._state is ConnectionState.CONNECTED:
            return
        if self._state is ConnectionState.CLOSED:
            raise BusClosedError(f"this {self.backend_name} event bus was closed; create a new one")
        await self._connect()
        self._state = ConnectionState.CONNECTED

    async def close(self) -> None:
        """Stop delivery, cancel subscriptions and close connections. Idempotent."""
        if self._state is ConnectionState.CLOSED:
            return
        self._state = ConnectionState.CLOSED
        for delivery in self._table.all():
            delivery.subscription._cancelled = True  # no _on_cancel round trips: the transport closes next
            await delivery.stop()
        self._table = SubscriptionTable()
        await self._close()

    async def __aenter__(self) -> BaseEventBus:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- publish -------------------------------------------------------------

    def _check_publish(self, topic: str, event: Event) -> None:
        if not isinstance(event, Event):
            raise TypeError(f"publish() takes an Event, got {type(event).__name__}")
        if event.topic != topic:
            raise ValueError(
                f"publish({topic!r}, event) with event.topic={event.topic!r}: they must be equal"
            )
        check_event(event)
        if self._state is not ConnectionState.CONNECTED and self._state is not ConnectionState.RECONNECTING:
            raise BusClosedError(
                f"cannot publish on a {self._state.value} {self.backend_name} event bus: "
                + ("it was closed" if self._state is ConnectionState.CLOSED else "await bus.connect() first")
            )

    async def publish(self, topic: str, event: Event) -> None:
        """Publish ``event`` to ``topic`` (which must equal ``event.topic``).

        Raises :class:`EventSerializationError` before anything is sent when the
        payload is not JSON, and :class:`BusClosedError` when the bus is not open.
        """
        self._check_publish(topic, event)
        await self._send([event])
        self.stats.published += 1

    async def publish_many(self, events: Iterable[Event]) -> None:
        """Publish several events in as few round trips as the transport allows, in order."""
        batch = list(events)
        for event in batch:
            self._check_publish(event.topic, event)
        if batch:
            await self._send(batch)
            self.stats.published += len(batch)

    # -- subscribe -----------------------------------------------------------

    async def subscribe(self, topic: str, handler: Handler, pattern: str | None = None) -> Subscription:
        """Call ``handler(event)`` for each event on ``topic``, or on every topic matching ``pattern``.

        ``pattern`` uses fnmatch syntax (``inventory:*``); when it is given the
        subscription matches by pattern and ``topic`` is only its label.
        """
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        if self._state is ConnectionState.CLOSED:
            raise BusClosedError(f"cannot subscribe on a closed {self.backend_name} event bus")
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty string")
        subscription = Subscription(topic=topic, pattern=pattern, handler=handler, _on_cancel=self._cancel)
        delivery = Delivery(subscription, handler, self.stats, self.queue_size)
        key = ("pattern", pattern) if pattern is not None else ("topic", topic)
        is_new = not (
            self._table.has_pattern(pattern) if pattern is not None else self._table.has_topic(topic)
        )
        self._table.add(delivery)
        if self._state in (ConnectionState.CONNECTED, ConnectionState.RECONNECTING):
            if is_new:
                # Concurrent subscribers of the same new topic wait for this one LISTEN/
                # SUBSCRIBE, so none returns before the transport delivers to it.
                pending = self._listening[key] = asyncio.get_running_loop().create_future()
                try:
                    await self._listen(topic, pattern)
                except BaseException:
                    self._table.remove(delivery)
                    raise
                finally:
                    del self._listening[key]
                    pending.set_result(None)
            elif key in self._listening:
                await asyncio.shield(self._listening[key])
        return subscription

    async def _cancel(self, subscription: Subscription) -> None:
        for delivery in self._table.all():
            if delivery.subscription is subscription:
                self._table.remove(delivery)
                await delivery.stop()
                pattern = subscription.pattern
                still_used = (
                    self._table.has_pattern(pattern)
                    if pattern is not None
                    else self._table.has_topic(subscription.topic)
                )
                if not still_used and self._state is ConnectionState.CONNECTED:
                    await self._unlisten(subscription.topic, pattern)
                return

    # -- local delivery ------------------------------------------------------

    async def _dispatch_inline(self, event: Event) -> None:
        """Run every matching handler now, one after the other (memory backend)."""
        for delivery in self._table.match(event.topic):
            await delivery.deliver(event)

    def _dispatch_queued(self, event: Event) -> None:
        """Hand the event to each matching subscription's queue (network backends)."""
        for delivery in self._table.match(event.topic):
            delivery.offer(event)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued event was handled (for a graceful shutdown)."""
        await asyncio.gather(*(d.drain(timeout) for d in self._table.all()))

    # -- transport hooks -----------------------------------------------------

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _send(self, events: list[Event]) -> None:
        raise NotImplementedError

    async def _listen(self, topic: str, pattern: str | None) -> None:
        """Start receiving ``topic`` (or ``pattern``) from the transport; called once per distinct one."""

    async def _unlisten(self, topic: str, pattern: str | None) -> None:
        """Stop receiving ``topic`` (or ``pattern``) once no subscription needs it."""
