"""The long-running commands in this process: eventbus_listen, eventbus_relay, eventbus_stream_consumer.

tests/test_listener.py, test_leases.py and test_streams.py run them as real processes (what
production runs); here ``call_command`` runs them in the test process, stopped by SIGTERM
once they did their work, so that what they do is visible to this process (and measured
by coverage). A watcher thread does the writing and the checking while the command runs.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.core.management import call_command
from django.db import connections

from django_eventbus.delivery.consumers import Consumer, register, unregister
from django_eventbus.events import Event
from testproject.inventory.models import Product
from tests.services import require_redis

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _keep_sigint() -> Iterator[None]:
    # asyncio.run() resets the signals it handled to their defaults on exit: keep
    # pytest's Ctrl-C handling.
    sigint = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, sigint)


def run_until(command: str, *args: str, ready: str, work: Callable[[], bool], timeout: float = 60.0) -> str:
    """Run ``command`` here until ``work()`` (called in a thread, once it is ready) returns True.

    ``work`` is polled until it returns True or ``timeout``; then the command gets SIGTERM, as
    from a process manager. SIGTERM is sent only after ``ready`` was printed: the command's
    handler is installed by then. Returns the command's stderr.
    """
    err = io.StringIO()
    finished = threading.Event()
    outcome: dict[str, Any] = {"done": False}

    def watch() -> None:
        try:
            deadline = time.monotonic() + timeout
            while ready not in err.getvalue():
                if finished.is_set() or time.monotonic() > deadline:
                    return
                time.sleep(0.02)
            while not outcome["done"] and time.monotonic() < deadline:
                outcome["done"] = work()
                if not outcome["done"]:
                    time.sleep(0.05)
        except Exception as exc:  # reported by the test, after the command stopped
            outcome["error"] = exc
        finally:
            connections.close_all()
            if ready in err.getvalue() and not finished.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        call_command(command, *args, stderr=err)
    finally:
        finished.set()
        watcher.join(timeout + 10)
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["done"], f"{command}: the work was not done within {timeout}s; stderr:\n{err.getvalue()}"
    assert "shutting down" in err.getvalue()
    return err.getvalue()


def create(names: list[str]) -> None:
    for name in names:
        Product.objects.create(name=name, stock=2)


@pytest.fixture
def recorder() -> Iterator[tuple[Consumer, list[Event]]]:
    handled: list[Event] = []
    consumer = register(
        Consumer(name=f"t.inproc.{uuid.uuid4().hex[:6]}", pattern="inventory:product", func=handled.append)
    )
    yield consumer, handled
    unregister(consumer.name)


def names_of(events: list[Event]) -> list[str]:
    return [e.payload["fields"]["name"] for e in events]


@pytest.mark.parametrize("bus_kind", ["postgres", "redis"], indirect=True)
def test_eventbus_listen_runs_the_consumers_and_the_relay_until_sigterm(
    bus_kind: str, recorder: tuple[Consumer, list[Event]]
) -> None:
    _, handled = recorder
    names = [f"live{i}" for i in range(5)]
    created = threading.Event()

    def work() -> bool:
        if not created.is_set():
            create(names)
            created.set()
        return sorted(names_of(handled)) == names

    err = run_until("eventbus_listen", ready="listening on", work=work)
    assert f"listening on {bus_kind} bus" in err and "relay: on" in err


def test_stream_relay_then_stream_consumer_until_sigterm(recorder: tuple[Consumer, list[Event]]) -> None:
    require_redis()
    consumer, handled = recorder
    prefix = f"inproc{uuid.uuid4().hex[:6]}"
    url = f"redis-streams://127.0.0.1:6379/0?partitions=2&prefix={prefix}"
    names = [f"streamed{i}" for i in range(6)]
    create(names)
    client = redis.Redis(host="127.0.0.1", port=6379)
    try:

        def relayed() -> bool:
            keys = client.keys(f"{prefix}:inventory:product:*")
            return sum(int(client.xlen(key)) for key in keys) >= len(names)

        err = run_until("eventbus_relay", "--to", url, ready="relaying the event log", work=relayed)
        assert "relaying the event log to redis-streams://127.0.0.1:6379/0" in err

        err = run_until(
            "eventbus_stream_consumer",
            "--from",
            url,
            "--claim-idle",
            "5",
            ready="consuming",
            work=lambda: sorted(names_of(handled)) == sorted(names),
        )
        assert consumer.name in err
    finally:
        for key in client.keys(f"{prefix}:*"):
            client.delete(key)
        client.close()
