"""BusRunner: sync threads publishing after commit through the bus's loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

import pytest

from django_eventbus.capture.publishing import make_event
from django_eventbus.delivery.runtime import BusRunner
from django_eventbus.events import Event

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_publish_stuck_on_the_transport_blocks_no_other_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = BusRunner({"backend": "memory"})
    try:
        bus = runner.bus
        real_publish_many = bus.publish_many
        in_transport, release = threading.Event(), threading.Event()
        sent: list[str] = []

        async def hanging_publish_many(events: Iterable[Event]) -> None:
            batch = list(events)
            if not sent:  # the first batch hangs in the "network" until released
                in_transport.set()
                await asyncio.to_thread(release.wait, 10)
            sent.extend(event.event_id for event in batch)
            await real_publish_many(batch)

        monkeypatch.setattr(bus, "publish_many", hanging_publish_many)
        first = [make_event("t:first", payload={"i": 0})]
        later = [make_event("t:later", payload={"i": i}) for i in range(1, 4)]
        runner.publish_many(first)
        assert in_transport.wait(5), "the drain never reached the transport"

        # Another committing thread only queues its events: no lock is held across the send.
        other = threading.Thread(target=runner.publish_many, args=(later,))
        other.start()
        other.join(2)
        assert not other.is_alive(), "publish_many waited for another thread's network write"

        release.set()
        runner.flush(5)
        assert sent == [event.event_id for event in first + later]  # in order, nothing lost
    finally:
        release.set()
        runner.close()
