"""The process's event bus, run on one event loop in a background thread.

Django code is mostly synchronous (views, signals, ``on_commit``) while the
bus is asyncio. Calling ``async_to_sync`` from code that may itself run under
an event loop fails ("You cannot use AsyncToSync in the same thread as an
async event loop"), and an asyncio bus is bound to the loop that connected
it. So each process gets one bus, owned by one loop in a daemon thread; sync
code hands it coroutines with ``run_coroutine_threadsafe`` and async code
awaits the same futures. Handlers subscribed through it run on that loop.

The runner is built lazily from ``EVENTBUS["BUS"]`` and rebuilt when the
setting changes (the app's ``setting_changed`` receiver calls
:func:`reset_if_bus_changed`), like channels' layer manager.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from django_eventbus import signals, tracing
from django_eventbus.conf import conf
from django_eventbus.events import Event, Subscription, create_event_bus
from django_eventbus.events.base import BaseEventBus
from django_eventbus.events.types import Handler

__all__ = ["BusRunner", "ProcessBus", "aget_bus", "get_bus", "get_runner", "reset_runner"]

logger = logging.getLogger("django_eventbus")

T = TypeVar("T")

#: Publishes in flight after which sync publishers wait for the transport.
MAX_PENDING = 10_000


class BusRunner:
    """One connected bus on a private event loop thread."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="django-eventbus", daemon=True)
        self._bus: BaseEventBus | None = None
        self._listener: Any = None
        self._relay: Any = None
        self._connecting: asyncio.Lock | None = None
        self._outbox: collections.deque[Event] = collections.deque()
        self._outbox_changed = threading.Condition()
        self._queued = 0  # events ever put in the outbox
        self._sent = 0  # events ever taken out and published (or failed)
        self._draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = threading.Event()
        self._closed = False
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def in_runner_thread(self) -> bool:
        return threading.current_thread() is self._thread

    async def _ensure_bus(self) -> BaseEventBus:
        if self._bus is not None:
            return self._bus
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # two first calls must not build two buses
            return await self._build_bus()

    async def _build_bus(self) -> BaseEventBus:
        if self._bus is None:
            bus: BaseEventBus = create_event_bus(self.config)  # type: ignore[assignment]
            await bus.connect()
            self._bus = bus
            if bus.backend_name == "memory":
                # Development: no listener process sees a memory bus, so the registered
                # consumers (and the Channels forwarder) run here, on this loop.
                from .consumers import get_consumers
                from .listener import Listener

                self._listener = Listener(bus, get_consumers(), catch_up=False)
                await self._listener.start()
                if conf.STORE_EVENTS:
                    from .relay import Relay

                    # Run by run_relay() when a writer wakes it: no polling (no other
                    # process can write to a memory bus's log without waking it).
                    self._relay = Relay(bus)
        return self._bus

    # -- running coroutines on the bus loop ----------------------------------

    def submit(self, factory: Callable[[BaseEventBus], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run ``factory(bus)`` on the bus loop; returns a thread-safe future."""
        if self._closed:
            raise RuntimeError("the event bus runner was closed")

        async def run() -> T:
            return await factory(await self._ensure_bus())

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def call(self, factory: Callable[[BaseEventBus], Awaitable[T]], timeout: float | None = None) -> T:
        """Run ``factory(bus)`` on the bus loop and wait for its result (from a sync thread)."""
        if self.in_runner_thread():
            raise RuntimeError("BusRunner.call() would deadlock on the bus's own thread; use submit()")
        return self.submit(factory).result(timeout if timeout is not None else conf.PUBLISH_TIMEOUT)

    async def acall(self, factory: Callable[[BaseEventBus], Awaitable[T]]) -> T:
        """Await ``factory(bus)`` run on the bus loop, from any event loop."""
        if self.in_runner_thread():
            return await factory(await self._ensure_bus())
        return await asyncio.wrap_future(self.submit(factory))

    def run_relay(self) -> None:
        """Publish the log's pending relay rows on this (memory) bus, on the bus loop.

        :meth:`flush` waits for it, like for any submitted work.
        """

        async def run(bus: BaseEventBus) -> None:
            if self._relay is not None:
                try:
                    await self._relay.publish_pending()
                except Exception:
                    logger.exception("the in-process event relay failed; the next wake retries")

        self.submit(run)

    # -- conveniences -----------------------------------------------------------

    @property
    def bus(self) -> BaseEventBus:
        """The connected bus (connecting it if needed). Use its methods through call/acall."""
        if self._bus is None:
            if self.in_runner_thread():
                raise RuntimeError("the bus is not connected yet; await runner.acall(...) first")
            self.call(lambda bus: _identity(bus))
        assert self._bus is not None
        return self._bus

    def publish_many(self, events: list[Event], wait: bool = False) -> None:
        """Publish from sync code without waiting for the transport (unless ``wait``).

        The caller's commit is done; waiting for a network round trip would only slow
        the request. Events go to an outbox that one task on the bus loop drains, in
        order, in batches (one wake-up and one ``publish_many`` for whatever piled up,
        rather than a task per commit). The outbox's lock is only held to add or take
        events, never across network I/O. Failures are logged (the event log has the
        events). Past ``MAX_PENDING`` queued events the caller waits, so a slow or dead
        transport pushes back instead of growing memory without bound.
        """
        if self._closed:
            raise RuntimeError("the event bus runner was closed")
        with self._outbox_changed:
            self._outbox.extend(events)
            self._queued += len(events)
            target = self._queued
            start = not self._draining
            self._draining = True
        if start:
            self._loop.call_soon_threadsafe(self._start_drain)
        if self.in_runner_thread() or _loop_running_here():
            return
        with self._outbox_changed:
            if wait:
                self._outbox_changed.wait_for(lambda: self._sent >= target, conf.PUBLISH_TIMEOUT)
            elif len(self._outbox) > MAX_PENDING:
                self._outbox_changed.wait_for(lambda: len(self._outbox) <= MAX_PENDING, conf.PUBLISH_TIMEOUT)

    def _start_drain(self) -> None:
        task = self._loop.create_task(self._drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        bus = await self._ensure_bus()
        while True:
            with self._outbox_changed:
                batch = list(self._outbox)
                self._outbox.clear()
                if not batch:
                    self._draining = False
                    self._outbox_changed.notify_all()
                    return
            started = time.perf_counter()
            try:
                with tracing.publish_span(batch):
                    await bus.publish_many(batch)
                signals.published(batch, time.perf_counter() - started)
            except Exception:
                logger.exception(
                    "publishing %d event(s) (first %s) failed; the event log has them if STORE_EVENTS is on",
                    len(batch),
                    batch[0].event_id,
                )
            with self._outbox_changed:
                self._sent += len(batch)
                self._outbox_changed.notify_all()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything submitted so far has finished (tests, shutdown)."""
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending, timeout)
        if not self.in_runner_thread():
            with self._outbox_changed:
                target = self._queued
                self._outbox_changed.wait_for(lambda: self._sent >= target, timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True

        async def shutdown() -> None:
            if self._listener is not None:
                await self._listener.stop(timeout)
            if self._bus is not None:
                await self._bus.close()

        if self._thread.is_alive() and not self.in_runner_thread():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout)
            except Exception:
                logger.exception("closing the event bus failed")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._loop.is_running():
                self._loop.close()


async def _identity(bus: BaseEventBus) -> BaseEventBus:
    return bus


def _loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_runner: BusRunner | None = None
_runner_lock = threading.Lock()


def get_runner() -> BusRunner:
    """The process's :class:`BusRunner`, built from ``EVENTBUS["BUS"]`` on first use."""
    global _runner
    if _runner is None:
        with _runner_lock:
            if _runner is None:
                _runner = BusRunner(conf.bus_config())
                if not _atexit_registered:
                    _register_atexit()
    return _runner


_atexit_registered = False


def _register_atexit() -> None:
    # Publishing after commit is asynchronous: a short-lived process (a management
    # command, a script) must not exit with events still on their way. atexit runs
    # while the daemon runner thread is still alive.
    global _atexit_registered
    _atexit_registered = True
    atexit.register(reset_runner)


def reset_runner() -> None:
    """Close the process's bus; the next use builds a new one from the current settings."""
    global _runner
    with _runner_lock:
        runner, _runner = _runner, None
    if runner is not None:
        runner.close()


class ProcessBus:
    """The process's bus as an :class:`EventBus` usable from any thread or event loop.

    Each call runs on the runner's loop (where the transport lives); handlers run
    there too. ``connect``/``close`` are no-ops: the runner owns the connection.
    """

    def __init__(self, runner: BusRunner) -> None:
        self.runner = runner

    async def connect(self) -> None:
        await self.runner.acall(_identity)

    async def close(self) -> None:
        """The shared bus stays open; use :func:`reset_runner` to close it."""

    async def publish(self, topic: str, event: Event) -> None:
        await self.runner.acall(lambda bus: bus.publish(topic, event))

    async def publish_many(self, events: Iterable[Event]) -> None:
        batch = list(events)
        await self.runner.acall(lambda bus: bus.publish_many(batch))

    async def subscribe(self, topic: str, handler: Handler, pattern: str | None = None) -> Subscription:
        inner = await self.runner.acall(lambda bus: bus.subscribe(topic, handler, pattern))
        return self._wrap(inner)

    def subscribe_sync(self, topic: str, handler: Handler, pattern: str | None = None) -> Subscription:
        return self._wrap(self.runner.call(lambda bus: bus.subscribe(topic, handler, pattern)))

    def _wrap(self, inner: Subscription) -> Subscription:
        runner = self.runner

        async def cancel(_: Subscription) -> None:
            await runner.acall(lambda bus: inner.cancel())

        return Subscription(
            topic=inner.topic,
            pattern=inner.pattern,
            subscription_id=inner.subscription_id,
            created_at=inner.created_at,
            _on_cancel=cancel,
        )

    @property
    def stats(self) -> Any:
        return self.runner.bus.stats

    @property
    def backend(self) -> BaseEventBus:
        """The backend instance itself (only touch it on the runner's loop)."""
        return self.runner.bus


def get_bus() -> ProcessBus:
    """The process's bus, usable from sync or async code in any thread."""
    return ProcessBus(get_runner())


async def aget_bus() -> ProcessBus:
    """The process's bus, connected, from async code."""
    bus = get_bus()
    await bus.connect()
    return bus


def reset_if_bus_changed() -> None:
    """Drop the runner if the settings now name another bus (called on ``setting_changed``)."""
    # Only a different bus needs a new runner; other keys (MODELS…) are read live.
    if _runner is not None:
        try:
            same = _runner.config == conf.bus_config()
        except Exception:
            same = False
        if not same:
            reset_runner()
