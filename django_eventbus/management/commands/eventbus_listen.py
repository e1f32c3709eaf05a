"""``manage.py eventbus_listen``: print events live, or run the registered consumers."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from asgiref.sync import sync_to_async
from django.core.management.base import CommandError, CommandParser

from django_eventbus.conf import conf
from django_eventbus.delivery.consumers import Consumer, get_consumers
from django_eventbus.delivery.listener import Listener, position_for_since
from django_eventbus.delivery.relay import Relay
from django_eventbus.events import Event, create_event_bus
from django_eventbus.events.base import BaseEventBus
from django_eventbus.events.codec import dumps
from django_eventbus.management.base import EventbusCommand
from django_eventbus.metrics import register_bus


def format_line(event: Event, width: int = 100) -> str:
    """One readable line: time, type, topic, id, short payload."""
    payload = dumps(event.payload)
    if len(payload) > width:
        payload = payload[: width - 1] + "…"
    stamp = event.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"{stamp} {event.type.value:<11} {event.topic} {event.event_id} {payload}"


class Command(EventbusCommand):
    help = (
        "Listen to the event bus. With TOPIC_OR_PATTERN arguments, print matching events "
        "(one line each, or --json); without, run the registered consumers."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("topics", nargs="*", metavar="TOPIC_OR_PATTERN")
        parser.add_argument("--json", action="store_true", help="print each event as one JSON line")
        parser.add_argument(
            "--consumers",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="run the registered consumers (default: only when no topic is given)",
        )
        parser.add_argument(
            "--consumer",
            action="append",
            dest="only",
            metavar="NAME",
            help="run only this registered consumer (repeatable): dedicate processes to a slow "
            "or partitioned consumer",
        )
        parser.add_argument("--since", help="first replay the log after this event id or ISO 8601 time")
        parser.add_argument(
            "--relay",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="also run the relay, which publishes log rows no writer published "
            "(default: with the consumers; one is active per database)",
        )
        parser.add_argument(
            "--shutdown-timeout", type=float, default=10.0, help="seconds to let handlers finish"
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            help="serve Prometheus metrics on this port (extra [prometheus]; docs/operations.md)",
        )
        parser.add_argument("--metrics-addr", default="0.0.0.0", help="address of --metrics-port")

    def handle(self, *args: Any, **options: Any) -> None:
        if conf.CAPTURE == "database":
            # Database checks are not part of the default checks: a missing or outdated capture
            # trigger (E015) would silently lose writes, so refuse to start on one.
            self.check(databases=[conf.DATABASE_ALIAS])
        topics: list[str] = options["topics"]
        run_consumers = options["consumers"] if options["consumers"] is not None else not topics
        if not topics and not run_consumers:
            raise CommandError("nothing to do: give a TOPIC_OR_PATTERN or --consumers")
        start_after = None
        if options["since"]:
            if not conf.STORE_EVENTS:
                raise CommandError("--since needs the event log (EVENTBUS['STORE_EVENTS'] is off)")
            try:
                start_after = position_for_since(options["since"])
            except ValueError as exc:
                raise CommandError(str(exc)) from exc
        if conf.raw_bus_config().get("backend") == "memory":
            self.stderr.write(
                "warning: the memory bus only delivers inside one process; this listener sees "
                "nothing from other processes (use a redis:// or postgres:// bus)"
            )
        printers = [
            Consumer(
                name=f"eventbus_listen:{t}", pattern=t, func=self._printer(options["json"]), durable=False
            )
            for t in topics
        ]
        consumers = get_consumers() if run_consumers else []
        if options["only"]:
            known = {c.name for c in consumers}
            unknown = sorted(set(options["only"]) - known)
            if unknown:
                raise CommandError(
                    f"no registered consumer named {', '.join(unknown)} "
                    f"(registered: {', '.join(sorted(known)) or 'none'})"
                )
            consumers = [c for c in consumers if c.name in options["only"]]
        relay = options["relay"] if options["relay"] is not None else run_consumers
        if relay and not conf.STORE_EVENTS:
            if options["relay"]:
                raise CommandError("--relay needs the event log (EVENTBUS['STORE_EVENTS'] is off)")
            relay = False
        if options["metrics_port"] is not None:
            self._serve_metrics(options["metrics_addr"], options["metrics_port"])
        asyncio.run(self._run(printers, consumers, start_after, options["shutdown_timeout"], relay))

    def _serve_metrics(self, addr: str, port: int) -> None:
        try:
            from prometheus_client import start_http_server

            import django_eventbus.metrics.prometheus  # noqa: F401  # registers the metrics
        except ImportError:
            raise CommandError(
                '--metrics-port needs prometheus-client: pip install "django-eventbus[prometheus]"'
            ) from None
        try:
            start_http_server(port, addr=addr)  # a daemon thread; it ends with the process
        except OSError as exc:
            raise CommandError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
        self.stderr.write(f"metrics on http://{addr}:{port}/metrics")

    def _printer(self, as_json: bool) -> Any:
        out = sys.stdout

        def show(event: Event) -> None:
            out.write((dumps(event.to_dict()) if as_json else format_line(event)) + "\n")
            out.flush()

        return show

    async def _run(
        self,
        printers: list[Consumer],
        consumers: list[Consumer],
        start_after: int | None,
        timeout: float,
        run_relay: bool,
    ) -> None:
        config = await sync_to_async(conf.bus_config)()
        bus: BaseEventBus = create_event_bus(config)  # type: ignore[assignment]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await bus.connect()
        register_bus(bus)  # its counters show in metrics.get_stats() of this process
        listeners = []
        relay = Relay(bus) if run_relay else None
        try:
            if relay is not None:
                await relay.start()
            if printers:
                listeners.append(Listener(bus, printers, start_after=start_after))
            if consumers:
                listeners.append(Listener(bus, consumers))
            for listener in listeners:
                await listener.start()
            names = ", ".join(c.name for c in consumers) or "-"
            self.stderr.write(
                f"listening on {bus.backend_name} bus; consumers: {names}; relay: {'on' if relay else 'off'}"
            )
            self.stderr.flush()
            await stop.wait()
            self.stderr.write("shutting down")
        finally:
            if relay is not None:
                await relay.stop()
            for listener in listeners:
                await listener.stop(timeout)
            await bus.close()
