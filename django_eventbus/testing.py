"""Helpers for testing code that emits events: assert "this block emitted that event".

    from django_eventbus.testing import capture_events

    def test_restock(db):
        with capture_events("inventory:*") as events:
            product.restock(5)          # commits
        assert events.types() == ["updated"]

With pytest, ``pytest_plugins = ["django_eventbus.testing"]`` adds a
``captured_events`` fixture (all topics). Events are captured when they are
*published*, i.e. after commit: in a ``TestCase`` (which never commits) wrap
the block in ``self.captureOnCommitCallbacks(execute=True)``, or use
``transaction=True`` tests with pytest-django.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from .capture.outbox import flush_pending
from .delivery.runtime import get_bus
from .events import Event

__all__ = ["CapturedEvents", "capture_events", "captured_events"]


class CapturedEvents(list[Event]):
    """The events captured so far (a list), with helpers for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def add(self, event: Event) -> None:
        with self._changed:
            self.append(event)
            self._changed.notify_all()

    def topics(self) -> list[str]:
        return [e.topic for e in self]

    def types(self) -> list[str]:
        return [e.type.value for e in self]

    def payloads(self) -> list[Any]:
        return [e.payload for e in self]

    def wait_for(self, count: int, timeout: float = 5.0) -> CapturedEvents:
        """Block until at least ``count`` events arrived (events from other processes take a moment)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self) >= count, timeout):
                raise AssertionError(
                    f"expected {count} events within {timeout}s, got {len(self)}: {self.topics()}"
                )
        return self


@contextlib.contextmanager
def capture_events(pattern: str = "*") -> Iterator[CapturedEvents]:
    """Capture every event published on the process's bus to topics matching ``pattern``."""
    captured = CapturedEvents()
    bus = get_bus()
    subscription = bus.subscribe_sync(pattern, captured.add, pattern=pattern)
    try:
        yield captured
        flush_pending()
    finally:
        if not bus.runner.closed:  # a settings change may have replaced the bus meanwhile
            bus.runner.call(lambda _: subscription.cancel())


try:
    import pytest
except ImportError:  # pragma: no cover - the fixture is only for pytest users
    pass
else:

    @pytest.fixture
    def captured_events() -> Iterator[CapturedEvents]:
        """Every event published during the test."""
        with capture_events() as events:
            yield events
