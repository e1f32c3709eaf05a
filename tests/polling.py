"""Waiting with a deadline: poll a condition instead of sleeping and then asserting.

Each helper fails with ``AssertionError("<what> not met within <timeout>s")``. The
default timeout is generous on purpose: a passing test returns as soon as its
condition holds, and a busy CI machine must not turn a slow pass into a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_TIMEOUT = 30.0


def wait_until(
    condition: Callable[[], object], timeout: float = DEFAULT_TIMEOUT, what: str = "condition"
) -> None:
    """Block until ``condition()`` is true (for threads and synchronous tests)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


async def await_until(
    condition: Callable[[], object],
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "condition",
) -> None:
    """Poll ``condition()`` on the running loop until it is true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.005)


async def await_until_async(
    condition: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll an awaitable condition (a query to a server) until it is true."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.02)


async def returns(query: Callable[[], Awaitable[Any]], expected: Any) -> bool:
    """Whether ``query()`` now returns ``expected`` (a condition for :func:`await_until_async`)."""
    return bool(await query() == expected)
