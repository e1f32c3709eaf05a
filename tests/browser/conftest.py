"""Browser tests: Debian's Chromium driven by Playwright's sync API.

They run in their own pytest invocation (``-m browser``): Playwright keeps an
event loop running in the test thread, which would break asyncio tests that run
after them in the same process (and needs ``DJANGO_ALLOW_ASYNC_UNSAFE=true`` for
the ORM calls the tests make).
"""

from __future__ import annotations

from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    # Playwright cannot download its own browser here: use the system's.
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "headless": True, "args": CHROMIUM_ARGS}
