"""ORM calls from async tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from django.db import connections

T = TypeVar("T")


async def orm(work: Callable[[], T]) -> T:
    """Run ORM code in a worker thread, closing the connection that thread opened.

    A connection left open in some executor thread would keep PostgreSQL from
    dropping the test database at the end of the session.
    """

    def run() -> T:
        try:
            return work()
        finally:
            connections.close_all()

    return await asyncio.to_thread(run)
