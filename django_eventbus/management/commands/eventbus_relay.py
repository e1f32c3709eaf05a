"""``manage.py eventbus_relay --to redis-streams://…``: relay the whole event log to a stream engine."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from asgiref.sync import sync_to_async
from django.core.management.base import CommandError, CommandParser

from django_eventbus.conf import conf
from django_eventbus.delivery.streams import StreamRelay, StreamTarget, parse_target
from django_eventbus.delivery.streams.redis_streams import RedisStreamSink
from django_eventbus.events import Event, create_event_bus
from django_eventbus.events.base import BaseEventBus
from django_eventbus.management.base import EventbusCommand


def stream_target(url: str | None) -> StreamTarget:
    """The target of ``--to``/``--from``, else ``EVENTBUS["STREAMS"]``; a CommandError if neither."""
    url = url or conf.get("STREAMS")
    if not url:
        raise CommandError("no stream target: give --to/--from or set EVENTBUS['STREAMS']")
    try:
        return parse_target(str(url))
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


class Command(EventbusCommand):
    help = (
        "Relay every event of the log, in log order and once each, to a stream engine "
        "(redis-streams://host:port/db?partitions=4&maxlen=100000&prefix=eventbus). "
        "One relay is active per target and database; others stand by."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", help="the stream target URL (default: EVENTBUS['STREAMS'])")
        parser.add_argument("--interval", type=float, help="seconds between polls of the log")
        parser.add_argument("--batch-size", type=int, default=5000, help="log rows per pipelined batch")

    def handle(self, *args: Any, **options: Any) -> None:
        if not conf.STORE_EVENTS:
            raise CommandError("the stream relay reads the event log: EVENTBUS['STORE_EVENTS'] is off")
        target = stream_target(options["to"])
        asyncio.run(self._run(target, options["interval"], options["batch_size"]))

    async def _run(self, target: StreamTarget, interval: float | None, batch_size: int) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sink = RedisStreamSink(target)
        await sink.connect()
        relay = StreamRelay(sink, interval=interval, batch_size=batch_size)
        bus = await self._wake_on_bus(relay)
        try:
            await relay.start()
            self.stderr.write(f"relaying the event log to {target.name}")
            self.stderr.flush()
            await stop.wait()
            self.stderr.write("shutting down")
        finally:
            await relay.stop()
            if bus is not None:
                await bus.close()
            await sink.close()

    async def _wake_on_bus(self, relay: StreamRelay) -> BaseEventBus | None:
        """Wake the relay on every event the bus carries: live latency for writers that publish.

        Writers that leave relay rows NOTIFY the relay themselves; the poll finds the rest.
        """
        if conf.raw_bus_config().get("backend") == "memory":
            return None  # another process's memory bus is out of reach: the poll does it
        config = await sync_to_async(conf.bus_config)()
        bus: BaseEventBus = create_event_bus(config)  # type: ignore[assignment]
        await bus.connect()

        def wake(_event: Event) -> None:
            relay.wake()

        await bus.subscribe("*", wake, pattern="*")
        return bus
