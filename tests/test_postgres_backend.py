"""What is specific to the PostgreSQL backend: the NOTIFY size limit, faults, garbage, SQL safety.

The behaviour every backend shares is in ``test_bus_contract.py``. Tests that need
the server get it from ``tests/services.py``; the restart tests start a throwaway
cluster of their own with ``initdb``/``pg_ctl`` so that they can stop and start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from django_eventbus.events import (
    ConnectionState,
    Event,
    EventBusError,
    EventSerializationError,
    EventType,
    create_event_bus,
)
from django_eventbus.events.codec import dumps_event
from django_eventbus.events.postgres import MAX_PAYLOAD_BYTES, PostgresEventBus
from tests.polling import await_until as eventually
from tests.services import IN_CI, free_port, require_postgres

pytestmark = pytest.mark.postgres

MakeBus = Callable[..., Awaitable[PostgresEventBus]]


# -- helpers -------------------------------------------------------------------


def ev(topic: str = "t", **payload: Any) -> Event:
    return Event(type=EventType.CREATED, topic=topic, payload=payload)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def event_of_size(size: int, char: str = "ä", **kwargs: Any) -> Event:
    """An event whose JSON encoding is ``size`` UTF-8 bytes (give or take one character)."""
    empty = len(dumps_event(Event(type=EventType.CREATED, topic="big", payload={"s": ""}, **kwargs)).encode())
    count = (size - empty) // len(char.encode())
    return Event(type=EventType.CREATED, topic="big", payload={"s": char * count}, **kwargs)


def state_of(bus: PostgresEventBus) -> ConnectionState:
    # A call, so mypy does not narrow bus.state across the awaits that change it.
    return bus.state


def encoded_size(event: Event) -> int:
    return len(dumps_event(event).encode())


async def backend_pid(raw: psycopg.AsyncConnection[Any], application_name: str) -> int:
    cur = await raw.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
    )
    rows = await cur.fetchall()
    assert len(rows) == 1, f"expected one connection named {application_name!r}, found {rows}"
    return int(rows[0][0])


async def terminate(raw: psycopg.AsyncConnection[Any], application_name: str) -> None:
    pid = await backend_pid(raw, application_name)
    await raw.execute("SELECT pg_terminate_backend(%s)", (pid,))


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def pg_url() -> str:
    return require_postgres()


@pytest.fixture
async def make_bus(pg_url: str) -> AsyncIterator[MakeBus]:
    """A factory of buses, each on its own channel unless told; all closed after the test.

    ``app`` names the bus's connections (``<app>:listen``, ``<app>:publish``) so a test
    can find and kill exactly its own, even when other test runs share the server.
    """
    buses: list[PostgresEventBus] = []

    async def make(
        app: str | None = None, connect: bool = True, url: str | None = None, **options: Any
    ) -> Any:
        options.setdefault("channel_prefix", unique("pgtest"))
        conninfo = make_conninfo(url or pg_url, application_name=app or unique("evt"))
        bus = PostgresEventBus(conninfo, **options)
        buses.append(bus)
        if connect:
            await bus.connect()
        return bus

    yield make
    for bus in buses:
        await bus.close()


@pytest.fixture
async def raw(pg_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A plain autocommit connection, to act as another client on the server."""
    conn = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    yield conn
    await conn.close()


# -- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("", "non-empty"),
        (None, "non-empty"),
        ("x" * 64, "64 bytes"),
        ("ä" * 32, "64 bytes"),  # 32 characters, but 64 bytes in UTF-8
        ("a\x00b", "NUL"),
    ],
)
def test_invalid_channel_prefix_is_rejected_clearly(prefix: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PostgresEventBus("postgresql://localhost/db", channel_prefix=prefix)


@pytest.mark.parametrize("prefix", ["x" * 63, "€" * 21, "Events", "a:b.c-d e"])
def test_channel_prefix_up_to_63_bytes_is_accepted_verbatim(prefix: str) -> None:
    assert PostgresEventBus("postgresql://localhost/db", channel_prefix=prefix).channel == prefix


def test_invalid_options_are_rejected_without_echoing_the_password() -> None:
    with pytest.raises(ValueError, match="invalid PostgreSQL connection_string") as info:
        PostgresEventBus("host=db password=s3cret junk")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="queue_size"):
        PostgresEventBus("postgresql://localhost/db", queue_size=0)
    with pytest.raises(ValueError, match="publish_timeout"):
        PostgresEventBus("postgresql://localhost/db", publish_timeout=0)


def test_factory_builds_the_backend_from_a_url_or_a_config() -> None:
    bus = create_event_bus("postgresql://localhost/db")
    assert isinstance(bus, PostgresEventBus)
    assert bus.channel == "events"
    assert bus.queue_size == 10_000
    bus = create_event_bus(
        {"backend": "postgres", "connection_string": "dbname=x", "channel_prefix": "app", "queue_size": 5}
    )
    assert isinstance(bus, PostgresEventBus)
    assert (bus.channel, bus.queue_size) == ("app", 5)


# -- the 8000-byte NOTIFY limit --------------------------------------------------


async def test_postgres_refuses_payloads_of_8000_bytes(raw: psycopg.AsyncConnection[Any]) -> None:
    """The server fact the chunking exists for (and that MAX_PAYLOAD_BYTES stays under)."""
    channel = unique("limit")
    await raw.execute("SELECT pg_notify(%s, %s)", (channel, "x" * 7999))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="payload string too long"):
        await raw.execute("SELECT pg_notify(%s, %s)", (channel, "x" * 8000))
    assert MAX_PAYLOAD_BYTES < 8000


def test_an_event_up_to_the_limit_is_one_whole_notification() -> None:
    bus = PostgresEventBus("postgresql://localhost/db", channel_prefix="ch")
    event = event_of_size(MAX_PAYLOAD_BYTES, char="x")
    assert encoded_size(event) == MAX_PAYLOAD_BYTES
    assert bus.notifications_for(event) == [("ch", dumps_event(event))]


def with_4_byte_chars_after(prefix: str) -> Event:
    return Event(type=EventType.CREATED, topic="big", payload={"s": prefix + "𝄞" * 5000})


LARGE: dict[str, Callable[[], Event]] = {
    "just above the limit": lambda: event_of_size(MAX_PAYLOAD_BYTES + 1, char="x"),
    "7,990 bytes of ä": lambda: event_of_size(7990),
    "200 KB of ä€𝄞": lambda: event_of_size(200_000, char="ä€𝄞"),
    "𝄞 cut at offset 1": lambda: with_4_byte_chars_after("a"),
    "𝄞 cut at offset 2": lambda: with_4_byte_chars_after("ab"),
    "𝄞 cut at offset 3": lambda: with_4_byte_chars_after("abc"),
    "a 200-character event id": lambda: event_of_size(30_000, event_id="i" * 200),
}


@pytest.mark.parametrize("make_event", LARGE.values(), ids=LARGE.keys())
def test_large_event_is_split_into_unique_chunks_under_the_limit(make_event: Callable[[], Event]) -> None:
    bus = PostgresEventBus("postgresql://localhost/db", channel_prefix="ch")
    event = make_event()
    assert encoded_size(event) > MAX_PAYLOAD_BYTES
    pairs = bus.notifications_for(event)
    assert len(pairs) > 1
    assert {channel for channel, _ in pairs} == {"ch"}
    payloads = [payload for _, payload in pairs]
    assert all(len(p.encode("utf-8")) <= MAX_PAYLOAD_BYTES for p in payloads)
    # PostgreSQL drops a repeated (channel, payload) of the same transaction.
    assert len(set(payloads)) == len(payloads)
    # (that they reassemble into the event is tested through the server below)


def test_notifications_for_refuses_what_json_cannot_carry() -> None:
    bus = PostgresEventBus("postgresql://localhost/db")
    with pytest.raises(EventSerializationError):
        bus.notifications_for(ev(value={1, 2}))
    with pytest.raises(EventSerializationError, match="UTF-8"):
        bus.notifications_for(ev(value="lone surrogate \ud800"))


def large_stream() -> list[Event]:
    """Every LARGE event, with a small one in the middle."""
    events = [make_event() for make_event in LARGE.values()]
    return events[:2] + [ev("big", small=True)] + events[2:]


async def test_large_events_in_a_row_arrive_intact_and_in_order(make_bus: MakeBus) -> None:
    pub = await make_bus()
    sub = await make_bus(channel_prefix=pub.channel)
    got: list[Event] = []
    await sub.subscribe("big", got.append)
    sent = large_stream()
    for event in sent:
        await pub.publish("big", event)
    await eventually(lambda: len(got) == len(sent), what="every large event")
    assert got == sent
    assert [e.payload for e in got] == [e.payload for e in sent]
    assert sub.stats.invalid_messages == 0


async def test_publish_many_with_large_events_keeps_them_whole_and_in_order(make_bus: MakeBus) -> None:
    pub = await make_bus()
    sub = await make_bus(channel_prefix=pub.channel)
    got: list[Event] = []
    await sub.subscribe("big", got.append)
    sent = large_stream() + [ev("big", i=i) for i in range(5)] + large_stream()
    await pub.publish_many(sent)
    await eventually(lambda: len(got) == len(sent), what="every event of the batch")
    assert got == sent


async def test_publish_many_beyond_one_statement_keeps_order(make_bus: MakeBus) -> None:
    # More notifications than one statement carries: they go out in one transaction.
    bus = await make_bus()
    got: list[int] = []
    await bus.subscribe("seq", lambda e: got.append(e.payload["i"]))
    await bus.publish_many([ev("seq", i=i) for i in range(2500)])
    await eventually(lambda: len(got) == 2500, what="2500 events")
    assert got == list(range(2500))


async def test_chunks_reassemble_in_any_order_and_from_any_connection(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any]
) -> None:
    bus = await make_bus()
    got: list[Event] = []
    await bus.subscribe("big", got.append)
    event = event_of_size(40_000, char="€")
    pairs = bus.notifications_for(event)
    async with raw.transaction():
        for channel, payload in reversed(pairs):
            await raw.execute("SELECT pg_notify(%s, %s)", (channel, payload))
    await eventually(lambda: got, what="the reassembled event")
    assert got == [event]


async def test_notifications_for_is_delivered_at_commit_only(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any]
) -> None:
    """What the Django layer does: run the pairs on its own connection, in the model's transaction."""
    bus = await make_bus()
    got: list[Event] = []
    await bus.subscribe("big", got.append)
    rolled_back, committed = event_of_size(20_000), event_of_size(20_000)

    async def notify_all(event: Event) -> None:
        for channel, payload in bus.notifications_for(event):
            await raw.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    with pytest.raises(RuntimeError):
        async with raw.transaction():
            await notify_all(rolled_back)
            raise RuntimeError("roll back")
    async with raw.transaction():
        await notify_all(committed)
    # Notifications arrive in commit order: once the committed one is here, a rolled-back
    # one would have arrived before it.
    await eventually(lambda: got, what="the committed event")
    assert got == [committed]


async def test_incomplete_chunks_are_dropped_logged_and_counted(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    bus = await make_bus()
    got: list[Event] = []
    await bus.subscribe("big", got.append)
    bus.max_partial_events = 2
    for key in "ABC":  # a first chunk of three events whose other chunks never come
        await raw.execute("SELECT pg_notify(%s, %s)", (bus.channel, f"\x1echunk:0:2:1:{key}data"))
    big = event_of_size(20_000)
    with caplog.at_level(logging.WARNING, logger="django_eventbus"):
        await bus.publish("big", big)
        await eventually(lambda: got, what="the complete event")
    assert got == [big]
    # At most two partial events are kept: A went when C came, B when the real one came.
    assert bus.stats.invalid_messages == 2
    dropped = [r.getMessage() for r in caplog.records if "incomplete large event" in r.getMessage()]
    assert len(dropped) == 2 and "event A (1 of 2 chunks)" in dropped[0]

    bus.chunk_timeout = 0.0  # now any partial event is stale when the next one starts
    await raw.execute("SELECT pg_notify(%s, %s)", (bus.channel, "\x1echunk:0:2:1:Ddata"))
    await bus.publish("big", big)
    await eventually(lambda: len(got) == 2, what="the second complete event")
    assert bus.stats.invalid_messages == 4  # C (left from above) and D


# -- garbage and SQL injection -----------------------------------------------------


async def test_garbage_on_the_channel_is_logged_counted_and_skipped(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    bus = await make_bus()
    got: list[Event] = []
    await bus.subscribe("t", got.append)
    channel = bus.channel
    with caplog.at_level(logging.WARNING, logger="django_eventbus"):
        await raw.execute(sql.SQL("NOTIFY {}, {}").format(sql.Identifier(channel), sql.Literal("not json")))
        garbage = [
            '{"type": "nope", "topic": "t", "payload": {}}',  # valid JSON, unknown event type
            '{"type": "created"}',  # no topic
            "[1, 2, 3]",
            "",
            "\x1echunk:zz",  # a malformed chunk frame
            "\x1echunk:5:2:1:Kdata",  # chunk index out of range
            '{"type": "created", "topic": "t", "timestamp": "yesterday"}',
        ]
        for payload in garbage:
            await raw.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        good = ev("t", ok=True)
        await bus.publish("t", good)
        await eventually(lambda: got, what="the good event after the garbage")
    assert got == [good]
    assert bus.stats.invalid_messages == 1 + len(garbage)
    warnings = [r for r in caplog.records if "ignored a message" in r.getMessage()]
    assert len(warnings) == 1 + len(garbage)
    assert "not json" in warnings[0].getMessage()
    assert state_of(bus) is ConnectionState.CONNECTED


async def test_deeply_nested_json_does_not_kill_the_listener(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any]
) -> None:
    bus = await make_bus()
    got: list[Event] = []
    await bus.subscribe("t", got.append)
    await raw.execute("SELECT pg_notify(%s, %s)", (bus.channel, "[" * 7000))  # RecursionError, not ValueError
    good = ev("t")
    await bus.publish("t", good)
    await eventually(lambda: got, what="the good event")
    assert got == [good]
    assert bus.stats.invalid_messages == 1


INJECTION = ["'; DROP TABLE {t}; --", '"; DROP TABLE {t}; --', "a'b\"c;d\\e", "$$; DROP TABLE {t}; $$", "{t}"]


@pytest.fixture
async def canary(raw: psycopg.AsyncConnection[Any]) -> AsyncIterator[str]:
    """A table that SQL injection through topics or payloads would drop."""
    name = unique("eventbus_canary")
    await raw.execute(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(name)))
    yield name
    await raw.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


async def table_exists(raw: psycopg.AsyncConnection[Any], name: str) -> bool:
    cur = await raw.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def test_topics_and_payloads_with_sql_are_just_data(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any], canary: str
) -> None:
    bus = await make_bus()
    got: list[Event] = []
    await bus.subscribe("all", got.append, pattern="*")
    sent = [ev(text.format(t=canary), text=text.format(t=canary)) for text in INJECTION]
    for event in sent:
        await bus.publish(event.topic, event)
    await bus.publish_many(sent[::-1])
    await eventually(lambda: len(got) == 2 * len(sent), what="every event")
    assert got == sent + sent[::-1]
    assert await table_exists(raw, canary)


async def test_channel_prefix_with_quotes_is_an_identifier_not_sql(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any], canary: str
) -> None:
    prefix = f'x"; DROP TABLE {canary}; --'
    assert len(prefix.encode()) <= 63
    bus = await make_bus(channel_prefix=prefix)
    got: list[Event] = []
    await bus.subscribe("t", got.append)
    first = ev("t", n=1)
    await bus.publish("t", first)
    # The channel is the prefix, character for character: another client reaches it by name.
    second = ev("t", n=2)
    await raw.execute("SELECT pg_notify(%s, %s)", (prefix, dumps_event(second)))
    await eventually(lambda: len(got) == 2, what="both events")
    assert got == [first, second]
    assert await table_exists(raw, canary)


async def test_buses_with_different_prefixes_do_not_see_each_other(make_bus: MakeBus) -> None:
    a, b = await make_bus(), await make_bus()
    got_a: list[Event] = []
    got_b: list[Event] = []
    await a.subscribe("same", got_a.append)
    await b.subscribe("same", got_b.append)
    to_a, to_b = ev("same", bus="a"), ev("same", bus="b")
    await a.publish("same", to_a)
    await b.publish("same", to_b)
    await eventually(lambda: got_a and got_b, what="one event on each bus")
    await b.publish("same", ev("same", marker=True))
    await eventually(lambda: len(got_b) == 2, what="the marker")
    assert got_a == [to_a]
    assert got_b[0] == to_b


# -- connections -------------------------------------------------------------------


async def test_listen_connection_is_opened_lazily_and_never_in_a_transaction(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any]
) -> None:
    app = unique("lazy")
    bus = await make_bus(app=app)
    await bus.publish("t", ev("t"))
    cur = await raw.execute(
        "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s ORDER BY 1",
        (f"{app}:%",),
    )
    assert [r[0] for r in await cur.fetchall()] == [f"{app}:publish"]
    got: list[Event] = []
    await bus.subscribe("t", got.append)
    await bus.subscribe("u", got.append)
    await bus.publish("t", ev("t"))
    await eventually(lambda: got, what="the event")
    cur = await raw.execute(
        "SELECT state FROM pg_stat_activity WHERE application_name = %s AND backend_type = 'client backend'",
        (f"{app}:listen",),
    )
    assert [r[0] for r in await cur.fetchall()] == ["idle"]  # one listener, not "idle in transaction"


async def test_subscriptions_made_before_connect_start_with_it(make_bus: MakeBus) -> None:
    bus = await make_bus(connect=False)
    got: list[Event] = []
    await bus.subscribe("t", got.append)
    await bus.connect()
    event = ev("t")
    await bus.publish("t", event)
    await eventually(lambda: got, what="the event")
    assert got == [event]


async def test_300_concurrent_publishes_on_one_bus_all_arrive(make_bus: MakeBus) -> None:
    pub = await make_bus()
    sub = await make_bus(channel_prefix=pub.channel)
    got: list[int] = []
    await sub.subscribe("c", lambda e: got.append(e.payload["i"]))
    await asyncio.gather(*(pub.publish("c", ev("c", i=i)) for i in range(300)))
    await eventually(lambda: len(got) == 300, what="300 events")
    assert sorted(got) == list(range(300))
    assert pub.stats.published == 300


async def test_killed_listener_reconnects_by_itself_and_says_so(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any]
) -> None:
    app = unique("kill")
    pub = await make_bus()
    sub = await make_bus(app=app, channel_prefix=pub.channel)
    lost: list[str] = []
    restored: list[str] = []

    async def on_restored() -> None:
        restored.append("restored")

    sub.on_connection_lost(lambda: lost.append("lost"))
    sub.on_connection_restored(on_restored)
    got: list[int] = []
    await sub.subscribe("s", lambda e: got.append(e.payload["i"]))
    old_pid = await backend_pid(raw, f"{app}:listen")

    stop = asyncio.Event()

    async def stream() -> int:
        i = 0
        while not stop.is_set():
            await pub.publish("s", ev("s", i=i))
            i += 1
            await asyncio.sleep(0.001)
        return i

    publisher = asyncio.create_task(stream())
    try:
        await eventually(lambda: len(got) >= 50, what="the stream to flow")
        await terminate(raw, f"{app}:listen")
        await eventually(lambda: restored, what="the connection to be restored")
        # LISTEN was active before "restored" fired; only the one publish in flight now
        # may have committed before that.
        resumed_at = pub.stats.published + 1
        await eventually(lambda: got and got[-1] >= resumed_at + 20, what="delivery to resume")
        stop.set()
        total = await asyncio.wait_for(publisher, 10)
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
    await eventually(lambda: got[-1] == total - 1, what="the last event")
    assert lost == ["lost"] and restored == ["restored"]
    assert sub.stats.reconnects == 1
    assert state_of(sub) is ConnectionState.CONNECTED
    assert await backend_pid(raw, f"{app}:listen") != old_pid
    # In order, no duplicates, and nothing published after the restore is missing (what
    # was published while it was down is gone: the "restored" callback is the cue to
    # catch up on it).
    assert got == sorted(set(got))
    assert set(range(resumed_at, total)) <= set(got)
    assert pub.stats.published == total


async def test_a_connection_lost_callback_may_close_the_bus(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any]
) -> None:
    app = unique("closing")
    bus = await make_bus(app=app)
    await bus.subscribe("t", lambda e: None)

    async def shut_down() -> None:
        await bus.close()

    bus.on_connection_lost(shut_down)
    await terminate(raw, f"{app}:listen")
    await eventually(lambda: bus.state is ConnectionState.CLOSED, what="the callback to close the bus")
    await eventually(
        lambda: not [t for t in asyncio.all_tasks() if t.get_name().startswith("eventbus-postgres")],
        what="the listener task to end",
    )
    # A closed connection's server process exits a moment later (seen on a busy machine): poll.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        cur = await raw.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (f"{app}:%",)
        )
        left = await cur.fetchone()
        if left == (0,) or loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert left == (0,)


async def test_killed_publish_connection_is_replaced_on_the_next_publish(
    make_bus: MakeBus, raw: psycopg.AsyncConnection[Any]
) -> None:
    app = unique("killpub")
    bus = await make_bus(app=app)
    lost: list[str] = []
    bus.on_connection_lost(lambda: lost.append("lost"))
    got: list[int] = []
    await bus.subscribe("p", lambda e: got.append(e.payload["i"]))
    await bus.publish("p", ev("p", i=0))
    await terminate(raw, f"{app}:publish")
    await bus.publish("p", ev("p", i=1))
    # again, with many publishers waiting on the lock when the connection goes
    await terminate(raw, f"{app}:publish")
    await asyncio.gather(*(bus.publish("p", ev("p", i=i)) for i in range(2, 52)))
    await eventually(lambda: len(got) == 52, what="every event")
    assert sorted(got) == list(range(52))
    assert lost == []  # the listener never noticed anything
    assert state_of(bus) is ConnectionState.CONNECTED


async def test_connect_to_an_unreachable_server_fails_loudly(make_bus: MakeBus) -> None:
    # connect() fails loudly: a wrong server is a configuration error, not something to retry.
    with pytest.raises(psycopg.OperationalError):
        await make_bus(url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")


# -- a real server restart ---------------------------------------------------------

PG_BIN = Path(os.environ.get("EVENTBUS_PG_BIN", "/usr/lib/postgresql/15/bin"))


class Cluster:
    """A throwaway PostgreSQL cluster in a temporary directory, on a free port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="eventbus-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # initdb refuses to run as root: run the server binaries as the postgres user then.
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")

    def run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        data = str(self.dir / "data")
        self.run(str(PG_BIN / "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-k {self.dir} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off"
        self.run(
            str(PG_BIN / "pg_ctl"),
            *("-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "30", "-o", options),
            "start",
        )

    def stop(self) -> None:
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):  # not running
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if not (PG_BIN / "initdb").exists():
        message = f"no PostgreSQL server binaries in {PG_BIN} (set EVENTBUS_PG_BIN)"
        if IN_CI:
            pytest.fail(f"{message}; CI=true: the restart test must run")
        pytest.skip(message)
    cluster = Cluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


async def test_bus_survives_a_server_restart(cluster: Cluster, make_bus: MakeBus) -> None:
    app = unique("restart")
    bus = await make_bus(app=app, url=cluster.url, publish_timeout=0.5)
    lost: list[str] = []
    restored: list[str] = []
    bus.on_connection_lost(lambda: lost.append("lost"))
    bus.on_connection_restored(lambda: restored.append("restored"))
    got: list[int] = []
    await bus.subscribe("r", lambda e: got.append(e.payload["i"]))
    await bus.publish("r", ev("r", i=1))
    await eventually(lambda: got == [1], what="the first event")

    await asyncio.to_thread(cluster.stop)
    await eventually(lambda: lost, what="the listener to notice the shutdown")
    assert state_of(bus) is ConnectionState.RECONNECTING
    # While the server is down, publish retries for publish_timeout, then says why it failed.
    with pytest.raises(EventBusError, match="could not publish to PostgreSQL within 0.5s"):
        await bus.publish("r", ev("r", i=2))

    await asyncio.to_thread(cluster.start)
    await eventually(lambda: restored, timeout=30, what="the listener to reconnect")
    assert state_of(bus) is ConnectionState.CONNECTED
    assert bus.stats.reconnects == 1
    await bus.publish("r", ev("r", i=3))  # the publish side reconnects too
    await eventually(lambda: got == [1, 3], what="an event after the restart")
    assert lost == ["lost"] and restored == ["restored"]


async def test_close_while_reconnecting_is_prompt_and_clean(cluster: Cluster, make_bus: MakeBus) -> None:
    bus = await make_bus(url=cluster.url)
    await bus.subscribe("r", lambda e: None)
    await asyncio.to_thread(cluster.stop)
    await eventually(lambda: bus.state is ConnectionState.RECONNECTING, what="the listener to notice")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(bus.close(), 5)
    assert loop.time() - started < 1.0
    assert state_of(bus) is ConnectionState.CLOSED
    # No reader task is left behind (pytest's warnings-as-errors would catch a pending one too).
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("eventbus-postgres")]


async def test_close_during_an_outage_is_bounded_twenty_times(cluster: Cluster, make_bus: MakeBus) -> None:
    # 20 buses lose their server; each is closed at another point of its reconnect loop.
    buses = [await make_bus(url=cluster.url) for _ in range(20)]
    for bus in buses:
        await bus.subscribe("r", lambda e: None)
    await asyncio.to_thread(cluster.stop)
    loop = asyncio.get_running_loop()
    for i, bus in enumerate(buses):
        await asyncio.sleep(0.013 * i)
        started = loop.time()
        await asyncio.wait_for(bus.close(), 10)
        assert loop.time() - started < 2, f"close #{i} took {loop.time() - started:.2f}s"
        assert state_of(bus) is ConnectionState.CLOSED
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("eventbus-postgres")]
