"""Where the real PostgreSQL and Redis are, and what to do when one is missing.

Under ``CI=true`` a missing service fails the test that needs it (a green CI
must mean the test ran); elsewhere it skips, saying why. Also: the bus setting
for each kind of bus, and free ports for servers a test starts itself.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.db import connection

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def postgres_url() -> str:
    """libpq-style settings from the environment, with the local defaults."""
    if os.environ.get("EVENTBUS_TEST_POSTGRES_URL"):
        return os.environ["EVENTBUS_TEST_POSTGRES_URL"]
    host = os.environ.get("PGHOST", "127.0.0.1")
    port = os.environ.get("PGPORT", "5432")
    user = os.environ.get("PGUSER", "postgres")
    password = os.environ.get("PGPASSWORD", "")
    db = os.environ.get("PGDATABASE", "postgres")
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@{host}:{port}/{db}"


def redis_url() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def require(name: str, url: str, default_port: int) -> str:
    if not _reachable(url, default_port):
        message = f"{name} is not reachable at {url}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: tests that need {name} must run)")
        pytest.skip(f"{message}; start it or set the URL (outside CI this test skips)")
    return url


def require_postgres() -> str:
    return require("PostgreSQL", postgres_url(), 5432)


def require_redis() -> str:
    return require("Redis", redis_url(), 6379)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server this test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
