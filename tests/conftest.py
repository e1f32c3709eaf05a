"""Shared fixtures: the bus of the Django layer, switched per test through settings.

Also the fixtures several test modules use: ``bus_kind`` (a real bus for this process),
``shared_database`` (the test database, for other processes) and ``throwaway_redis``.
Helpers that are not fixtures live in the support modules beside this file
(services, polling, orm, listener_processes, redis_servers, websocket_support, live_websocket).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from django.db import connection

from tests.listener_processes import bus_env
from tests.redis_servers import RedisServer
from tests.services import IN_CI, bus_setting

pytest_plugins = ["django_eventbus.testing"]


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


@pytest.fixture
def bus_kind(request: pytest.FixtureRequest, settings: Any) -> Iterator[str]:
    """Point this process's Django layer at a real bus (postgres on Django's DB, or redis)."""
    kind: str = request.param
    prefix = f"l{uuid.uuid4().hex[:10]}"
    from django_eventbus.delivery.runtime import reset_runner
    from django_eventbus.events.bus import parse_bus_url

    if kind == "postgres" and connection.vendor != "postgresql":
        pytest.skip("the postgres bus on Django's database needs DATABASE_URL=postgres://…")
    env = bus_env(kind, prefix)
    settings.EVENTBUS = {
        **settings.EVENTBUS,
        "BUS": {**parse_bus_url(env["EVENTBUS_URL"]), "channel_prefix": prefix},
    }
    yield kind
    reset_runner()


@pytest.fixture
def shared_database() -> str:
    """A DATABASE_URL for other processes: the PostgreSQL test database itself."""
    if connection.vendor != "postgresql":
        pytest.skip("multi-process tests need the Django database on PostgreSQL (.ci/run's PostgreSQL pass)")
    s = connection.settings_dict
    return f"postgres://{s['USER'] or 'postgres'}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


@pytest.fixture
def throwaway_redis() -> Iterator[Callable[..., Awaitable[RedisServer]]]:
    """Start private ``redis-server`` processes; each is killed at teardown, whatever happened."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not on PATH"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: the Redis fault tests must run)")
        pytest.skip(message)
    servers: list[RedisServer] = []

    async def start(*args: str, unix_socket: str | None = None) -> RedisServer:
        server = RedisServer(*args, unix_socket=unix_socket)
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        server.kill()
