"""Shared fixtures: the bus of the Django layer, switched per test through settings."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

from tests.services import require_postgres, require_redis

pytest_plugins = ["django_eventbus.testing"]


def bus_setting(kind: str) -> Any:
    """EVENTBUS["BUS"] for a kind of bus, each test on its own channel prefix."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if kind == "memory":
        return "memory://"
    if kind == "redis":
        return {"backend": "redis", "url": require_redis(), "channel_prefix": prefix}
    if kind == "postgres":
        # Its own connection to the server (works whatever the Django database is).
        return {"backend": "postgres", "connection_string": require_postgres(), "channel_prefix": prefix}
    if kind == "postgres-django":
        # No connection_string: Django's own database is the transport.
        if connection.vendor != "postgresql":
            pytest.skip("the Django database is not PostgreSQL in this run (see .ci/run's PostgreSQL run)")
        return {"backend": "postgres", "channel_prefix": prefix}
    raise ValueError(kind)


@pytest.fixture
def use_bus(settings: Any) -> Iterator[Any]:
    """``use_bus("redis")`` points the Django layer at that bus for this test."""

    def switch(kind: str, **extra: Any) -> Any:
        settings.EVENTBUS = {**settings.EVENTBUS, "BUS": bus_setting(kind), **extra}
        return settings.EVENTBUS

    yield switch
    from django_eventbus.delivery.runtime import reset_runner

    reset_runner()


@pytest.fixture(scope="session", autouse=True)
def _close_bus_at_session_end() -> Iterator[None]:
    # The process bus holds connections and a thread: close them before the interpreter exits.
    yield
    from django_eventbus.delivery.runtime import reset_runner

    reset_runner()
