"""``manage.py eventbus_stream_consumer``: run the ``@consumer`` functions in Redis Streams groups."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_eventbus.conf import conf
from django_eventbus.delivery.consumers import get_consumers
from django_eventbus.delivery.streams import StreamTarget
from django_eventbus.delivery.streams.redis_consumer import StreamGroupConsumer, default_member_name
from django_eventbus.delivery.streams.redis_streams import redis_client
from django_eventbus.management.base import EventbusCommand
from django_eventbus.management.commands.eventbus_relay import stream_target


class Command(EventbusCommand):
    help = (
        "Run the registered consumers on the streams the stream relay writes, each as a member "
        "of its consumer group (the consumer's name); start several processes to share the work."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--from", dest="source", help="the stream target URL (default: EVENTBUS['STREAMS'])"
        )
        parser.add_argument(
            "--claim-idle",
            type=float,
            help="seconds before a silent member counts as dead and its streams and pending "
            "entries are taken over (default: EVENTBUS['STREAM_CLAIM_IDLE'])",
        )
        parser.add_argument("--count", type=int, default=10, help="entries read per stream at a time")
        parser.add_argument("--member", help="this process's name in the groups (default: host:pid)")

    def handle(self, *args: Any, **options: Any) -> None:
        target = stream_target(options["source"])
        consumers = get_consumers()
        if not consumers:
            raise CommandError("no consumers are registered (see docs/consumers.md)")
        claim_idle = options["claim_idle"] or float(conf.get("STREAM_CLAIM_IDLE"))
        if claim_idle <= 0 or options["count"] < 1:
            raise CommandError("--claim-idle must be > 0 and --count >= 1")
        member = options["member"] or default_member_name()
        asyncio.run(self._run(target, claim_idle, options["count"], member))

    async def _run(self, target: StreamTarget, claim_idle: float, count: int, member: str) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        client = redis_client(target)
        members = [
            StreamGroupConsumer(client, target, c, member=member, claim_idle=claim_idle, count=count)
            for c in get_consumers()
        ]
        try:
            names = ", ".join(m.group for m in members)
            self.stderr.write(f"consuming {target.name} as {member}; consumers: {names}")
            self.stderr.flush()
            await asyncio.gather(*(m.run(stop) for m in members))
            self.stderr.write("shutting down")
        finally:
            await client.aclose()
