"""The postgres bus behind a real PgBouncer in transaction pooling mode.

Each test starts its own ``pgbouncer`` (Debian's package; ``scripts/test`` installs it)
on a free port, pointing at the test PostgreSQL. Publishing goes through the pooler,
LISTEN goes straight to PostgreSQL (``listen_connection_string``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from django.core.checks import run_checks
from django.db import connections
from django.test import override_settings

from django_eventbus.conf import conf
from django_eventbus.events import Event, EventType, create_event_bus
from django_eventbus.events.bus import parse_bus_url
from django_eventbus.events.postgres import PostgresEventBus
from tests.polling import await_until as eventually
from tests.services import IN_CI, free_port, require_postgres

pytestmark = pytest.mark.postgres

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
)


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(
        parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}")
    )


@pytest.fixture
def pgbouncer() -> Iterator[str]:
    """A private pgbouncer in transaction mode in front of the test PostgreSQL; its URL."""
    direct = require_postgres()
    if PGBOUNCER is None:
        message = "pgbouncer is not installed (apt-get install pgbouncer; scripts/test does it)"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: the PgBouncer tests must run)")
        pytest.skip(message)
    target = urlsplit(direct)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="eventbus-pgbouncer-"))
    user = ["-u", "postgres"] if os.geteuid() == 0 else []  # pgbouncer refuses to run as root
    if user:
        entry = pwd.getpwnam("postgres")
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
    (workdir / "userlist.txt").write_text(f'"{target.username or "postgres"}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={target.hostname or "127.0.0.1"} port={target.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/userlist.txt
pool_mode = transaction
default_pool_size = 4
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
; Transaction mode hands each transaction to any server session; resetting the session
; after each one makes "any" certain, so a client relying on session state (a server-side
; prepared statement, a LISTEN) fails every time, not only under load.
server_reset_query = DISCARD ALL
server_reset_query_always = 1
"""
    )
    process = subprocess.Popen(
        [PGBOUNCER, *user, str(workdir / "pgbouncer.ini")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = with_port(direct, port)
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                log = (workdir / "pgbouncer.log").read_text() if (workdir / "pgbouncer.log").exists() else ""
                raise AssertionError(f"pgbouncer exited with {process.returncode}: {log[-2000:]}")
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def buses() -> AsyncIterator[list[PostgresEventBus]]:
    made: list[PostgresEventBus] = []
    yield made
    for bus in made:
        await bus.close()


def ev(n: int) -> Event:
    return Event(type=EventType.CREATED, topic="pooled", payload={"n": n})


async def test_publish_through_pgbouncer_while_listening_directly(
    pgbouncer: str, buses: list[PostgresEventBus]
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    bus = PostgresEventBus(pgbouncer, channel_prefix=prefix, listen_connection_string=require_postgres())
    buses.append(bus)
    await bus.connect()
    got: list[int] = []
    await bus.subscribe("pooled", lambda event: got.append(event.payload["n"]))
    # One statement at a time, 300 times: psycopg would prepare it after 5 (and fail after
    # the reset above with "prepared statement does not exist") if the bus let it.
    for n in range(300):
        await bus.publish("pooled", ev(n))
    await bus.publish_many([ev(n) for n in range(300, 310)])
    await eventually(lambda: len(got) >= 310, what="310 events through pgbouncer")
    assert got == list(range(310))
    assert bus.stats.reconnects == 0


async def test_listen_through_pgbouncer_in_transaction_mode_receives_nothing(
    pgbouncer: str, buses: list[PostgresEventBus]
) -> None:
    """Why listen_connection_string exists: the same bus with LISTEN through the pooler."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    pooled = PostgresEventBus(pgbouncer, channel_prefix=prefix)
    direct = PostgresEventBus(pgbouncer, channel_prefix=prefix, listen_connection_string=require_postgres())
    buses += [pooled, direct]
    for bus in buses:
        await bus.connect()
    through_pooler: list[int] = []
    direct_got: list[int] = []
    await pooled.subscribe("pooled", lambda event: through_pooler.append(event.payload["n"]))
    await direct.subscribe("pooled", lambda event: direct_got.append(event.payload["n"]))
    for n in range(20):
        await direct.publish("pooled", ev(n))
    # Every listening session gets a notification at the same commit: once the direct
    # listener has all of them, the pooled one would have had them too.
    await eventually(lambda: len(direct_got) == 20, what="the direct listener's events")
    assert through_pooler == []


@pytest.mark.pgdjango
def test_bus_url_listen_url_and_the_django_database() -> None:
    if connections["default"].vendor != "postgresql":
        pytest.skip("needs Django's database to be PostgreSQL (DATABASE_URL=postgres://…)")
    direct = "postgresql://app:s3cret@db.internal:5432/shop"
    config = parse_bus_url("postgres://?listen_url=" + quote(direct, safe=""))
    assert config == {"backend": "postgres", "listen_connection_string": direct}
    with override_settings(EVENTBUS={"BUS": config}):
        # Publishing and the log use Django's database (through PgBouncer); only LISTEN goes direct.
        assert conf.uses_django_database()
        built = conf.bus_config()
    assert built["listen_connection_string"] == direct
    assert built["connection_string"]
    bus = create_event_bus(built)
    assert isinstance(bus, PostgresEventBus)
    assert bus._listen_params["host"] == "db.internal" and bus._listen_params["port"] == "5432"


def _w004(bus: Any) -> list[str]:
    with override_settings(EVENTBUS={"BUS": bus}):
        return [m.msg for m in run_checks() if m.id == "django_eventbus.W004"]


def test_check_warns_when_the_listen_port_looks_like_pgbouncer(monkeypatch: pytest.MonkeyPatch) -> None:
    pooled = "postgresql://app@pgbouncer:6432/shop"
    assert _w004({"backend": "postgres", "connection_string": pooled})
    assert _w004(f"postgres://?listen_url={quote(pooled, safe='')}")
    assert _w004({"backend": "postgres", "connection_string": "host=pgb port=6432,5432 dbname=shop"})
    # LISTEN bypasses the pooler: no warning, whatever publishing goes through.
    direct = {
        "backend": "postgres",
        "connection_string": pooled,
        "listen_connection_string": "host=db dbname=shop",
    }
    assert not _w004(direct)
    assert not _w004("redis://127.0.0.1:6379/0")
    # Django's database as the transport: its PORT counts.
    monkeypatch.setitem(connections["default"].settings_dict, "PORT", "6432")
    assert _w004({"backend": "postgres"})
    monkeypatch.setitem(connections["default"].settings_dict, "PORT", "5432")
    assert not _w004({"backend": "postgres"})
