"""In-process backend for development and tests."""

from __future__ import annotations

from .base import BaseEventBus
from .types import Event

__all__ = ["InMemoryEventBus"]


class InMemoryEventBus(BaseEventBus):
    """Delivers within this process: ``publish`` returns once every matching handler ran.

    Handlers run one after the other, in subscription order, on the publisher's
    event loop (so a test can assert right after ``publish``). A handler that
    raises is logged with the event id and the others still run. Payloads are
    checked exactly as the network backends check them, so a payload that would
    fail in production fails here too.
    """

    backend_name = "memory"

    def __init__(self) -> None:
        super().__init__()

    async def _connect(self) -> None:
        pass

    async def _close(self) -> None:
        pass

    async def _send(self, events: list[Event]) -> None:
        for event in events:
            await self._dispatch_inline(event)
