"""What is particular to the Redis backend: configuration, PSUBSCRIBE routing, faults.

The behaviour every backend shares is in ``test_bus_contract.py``. Fault tests run
against throwaway ``redis-server`` processes (killed even when a test fails), so
killing clients or the server never disturbs anyone else using the shared Redis.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

from django_eventbus.events import BusClosedError, ConnectionState, Event, EventType, create_event_bus
from django_eventbus.events.codec import dumps_event
from django_eventbus.events.redis import RedisConnectionError, RedisEventBus
from tests.polling import await_until as wait_for
from tests.polling import await_until_async as wait_for_async
from tests.polling import returns
from tests.redis_servers import RedisServer
from tests.services import free_port, require_redis

pytestmark = pytest.mark.redis


# -- helpers -----------------------------------------------------------------------


async def settle() -> None:
    """Long enough for a stray (wrong) delivery to show up on loopback."""
    await asyncio.sleep(0.3)


def ev(topic: str, **payload: Any) -> Event:
    return Event(type=EventType.CREATED, topic=topic, payload=payload)


def with_query(url: str, **query: str) -> str:
    extra = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}"


@pytest.fixture
async def make_bus() -> AsyncIterator[Callable[..., Awaitable[RedisEventBus]]]:
    """Connected buses (of the shared Redis unless ``url`` says otherwise), closed after the test."""
    buses: list[RedisEventBus] = []
    prefix = f"t{uuid.uuid4().hex[:12]}"

    async def make(**options: Any) -> RedisEventBus:
        options.setdefault("channel_prefix", prefix)
        if "url" not in options and "host" not in options:
            options["url"] = require_redis()
        bus = RedisEventBus(**options)
        buses.append(bus)
        await bus.connect()
        return bus

    yield make
    for bus in buses:
        await bus.close()


async def publisher_and_subscriber(
    throwaway_redis: Any, make_bus: Any
) -> tuple[RedisServer, RedisEventBus, RedisEventBus]:
    """A private server with a publishing and a subscribing bus on it (for fault tests)."""
    server = await throwaway_redis()
    return server, await make_bus(url=server.url), await make_bus(url=server.url)


class StateLog:
    """Records the connection-state callbacks of a bus."""

    def __init__(self, bus: RedisEventBus) -> None:
        self.lost = 0
        self.restored = 0
        bus.on_connection_lost(self._lost)
        bus.on_connection_restored(self._restored)

    def _lost(self) -> None:
        self.lost += 1

    async def _restored(self) -> None:  # async callbacks are supported too
        self.restored += 1


async def our_connections(admin: redis.asyncio.Redis, name: str) -> list[dict[str, Any]]:
    return [c for c in await admin.client_list() if c.get("name") == name]


# -- configuration (no server needed) ------------------------------------------------


def test_defaults() -> None:
    bus = RedisEventBus()
    assert bus.connection_class is Connection
    assert bus.connection_kwargs["host"] == "127.0.0.1"
    assert bus.connection_kwargs["port"] == 6379
    assert bus.connection_kwargs.get("db", 0) == 0
    assert bus.channel_prefix == "events"
    assert bus.queue_size == 10_000
    assert "hunter2" not in repr(RedisEventBus(url="redis://:hunter2@example.com/0"))


def test_url_is_the_base_and_explicit_keys_override_it() -> None:
    url = "redis://alice:pw@example.com:6380/2"
    from_url = RedisEventBus(url=url).connection_kwargs
    assert (from_url["host"], from_url["port"], from_url["db"]) == ("example.com", 6380, 2)
    assert (from_url["username"], from_url["password"]) == ("alice", "pw")
    overridden = RedisEventBus(
        url=url, host="h", port=1, db=3, username="bob", password="x"
    ).connection_kwargs
    assert (overridden["host"], overridden["port"], overridden["db"]) == ("h", 1, 3)
    assert (overridden["username"], overridden["password"]) == ("bob", "x")


def test_rediss_url_builds_tls_connections() -> None:
    bus = RedisEventBus(url="rediss://:secret@cache.example.com:6380/1?ssl_cert_reqs=none")
    assert bus.connection_class is SSLConnection
    assert bus.connection_kwargs["password"] == "secret"
    # The kwargs are valid for the class: this is exactly how the bus builds its connections.
    conn = bus.connection_class(**bus.connection_kwargs)
    assert isinstance(conn, SSLConnection)
    assert (conn.host, conn.port, conn.db) == ("cache.example.com", 6380, 1)
    assert conn.cert_reqs == ssl.CERT_NONE


def test_seed_guide_elasticache_config_uses_tls() -> None:
    bus = create_event_bus(
        {"backend": "redis", "host": "my-cluster.cache.amazonaws.com", "port": 6379, "ssl": True}
    )
    assert isinstance(bus, RedisEventBus)
    assert bus.connection_class is SSLConnection
    conn = bus.connection_class(**bus.connection_kwargs)
    assert conn.host == "my-cluster.cache.amazonaws.com"
    assert conn.cert_reqs == ssl.CERT_REQUIRED  # verified by default


def test_ssl_false_turns_a_rediss_url_into_plain_tcp() -> None:
    bus = RedisEventBus(url="rediss://example.com?ssl_cert_reqs=none", ssl=False)
    assert bus.connection_class is Connection
    assert not any(key.startswith("ssl_") for key in bus.connection_kwargs)
    bus.connection_class(**bus.connection_kwargs)  # no TLS option left that Connection would reject


def test_bus_url_through_create_event_bus() -> None:
    bus = create_event_bus("rediss://example.com:7000/4")
    assert isinstance(bus, RedisEventBus)
    assert bus.connection_class is SSLConnection
    assert (bus.connection_kwargs["port"], bus.connection_kwargs["db"]) == (7000, 4)
    unix = create_event_bus("unix:///run/redis.sock?db=3")
    assert isinstance(unix, RedisEventBus)
    assert unix.connection_class is UnixDomainSocketConnection
    assert unix.connection_kwargs["path"] == "/run/redis.sock"
    assert unix.connection_kwargs["db"] == 3
    assert "host" not in unix.connection_kwargs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "unix:///run/redis.sock", "host": "x"}, "do not apply to the unix socket"),
        ({"url": "http://example.com"}, "scheme"),
        ({"channel_prefix": ""}, "channel_prefix"),
        ({"queue_size": 0}, "queue_size"),
    ],
)
def test_bad_options_are_clear_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisEventBus(**options)


def test_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="invalid options for the 'redis' event bus"):
        create_event_bus({"backend": "redis", "hots": "example.com"})


# -- the shared server: connection options --------------------------------------------


async def test_db_and_client_name_reach_both_connections(make_bus: Any) -> None:
    name = f"evt-{uuid.uuid4().hex[:8]}"
    bus = await make_bus(url=with_query(require_redis(), client_name=name), db=5)
    got: list[Event] = []
    await bus.subscribe("t", got.append)
    await bus.publish("t", ev("t"))
    await wait_for(lambda: len(got) == 1)
    admin = redis.asyncio.Redis.from_url(require_redis())
    try:
        conns = await our_connections(admin, name)
    finally:
        await admin.aclose()
    assert {c["db"] for c in conns} == {"5"}
    assert sorted("P" in c["flags"] for c in conns) == [False, True]  # one publisher, one subscriber


async def test_connect_to_nothing_fails_fast_and_clearly(make_bus: Any) -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RedisConnectionError, match=f"cannot connect to Redis at 127.0.0.1:{port}"):
        await make_bus(url=f"redis://127.0.0.1:{port}/0")
    assert time.monotonic() - start < 5


async def test_subscriptions_made_before_connect_start_at_connect(make_bus: Any) -> None:
    pub = await make_bus()
    sub = RedisEventBus(url=require_redis(), channel_prefix=pub.channel_prefix)
    got: list[str] = []
    await sub.subscribe("early", lambda e: got.append(e.topic))
    await sub.subscribe("early-pattern", lambda e: got.append("p " + e.topic), pattern="early*")
    try:
        await sub.connect()
        await pub.publish("early", ev("early"))
        await wait_for(lambda: len(got) == 2)
        assert sorted(got) == ["early", "p early"]
    finally:
        await sub.close()


async def test_close_with_publishes_in_flight(make_bus: Any) -> None:
    bus = await make_bus(max_connections=2)
    publishes = [asyncio.create_task(bus.publish("t", ev("t", i=i))) for i in range(50)]
    await asyncio.sleep(0)
    await bus.close()
    results = await asyncio.gather(*publishes, return_exceptions=True)
    assert all(r is None or isinstance(r, BusClosedError) for r in results), results
    assert any(isinstance(r, BusClosedError) for r in results)
    gc.collect()  # an unclosed connection would warn now (warnings are errors)


# -- PSUBSCRIBE routing: once each, fnmatch semantics ------------------------------------


async def test_exact_and_patterns_sharing_a_redis_glob_get_each_event_once(make_bus: Any) -> None:
    name = f"evt-{uuid.uuid4().hex[:8]}"
    pub = await make_bus()
    sub = await make_bus(url=with_query(require_redis(), client_name=name))
    got: dict[str, list[str]] = {"exact": [], "all": [], "pq": [], "q": []}
    subs = [
        await sub.subscribe("inventory:product", lambda e: got["exact"].append(e.topic)),
        # three fnmatch patterns, one Redis glob ("<prefix>:inventory:*"): one PSUBSCRIBE
        await sub.subscribe("all", lambda e: got["all"].append(e.topic), pattern="inventory:*"),
        await sub.subscribe("pq", lambda e: got["pq"].append(e.topic), pattern="inventory:[pq]*"),
        await sub.subscribe("q", lambda e: got["q"].append(e.topic), pattern="inventory:?roduct"),
    ]
    admin = redis.asyncio.Redis.from_url(require_redis())

    subscriber_ids: list[str] = []

    async def counts() -> tuple[int, int]:
        conns = await our_connections(admin, name)
        if not subscriber_ids:
            subscriber_ids.extend(c["id"] for c in conns if "P" in c["flags"])
        (conn,) = [c for c in conns if c["id"] in subscriber_ids]
        return int(conn["sub"]), int(conn["psub"])

    try:
        assert await counts() == (1, 1)
        for topic in ["inventory:product", "inventory:order", "inventory:xyz", "billing:product"]:
            await pub.publish(topic, ev(topic))
        await wait_for(lambda: len(got["all"]) == 3)
        await settle()
        assert got == {
            "exact": ["inventory:product"],
            "all": ["inventory:product", "inventory:order", "inventory:xyz"],
            "pq": ["inventory:product"],
            "q": ["inventory:product"],
        }
        # The glob stays subscribed while one of its patterns is in use.
        await subs[1].cancel()
        await subs[2].cancel()
        assert await counts() == (1, 1)
        await subs[3].cancel()
        await subs[0].cancel()
        await wait_for_async(lambda: returns(counts, (0, 0)), timeout=5, what="unsubscribed")
    finally:
        await admin.aclose()


async def test_fnmatch_only_syntax(make_bus: Any) -> None:
    pub, sub = await make_bus(), await make_bus()
    not_a: list[str] = []
    star: list[str] = []
    await sub.subscribe("not-a", lambda e: not_a.append(e.topic), pattern="[!a]*")
    await sub.subscribe(
        "star", lambda e: star.append(e.topic), pattern="x[*]\\*"
    )  # literal "*", then "\" + any
    for topic in ["abc", "bcd", "xyz", "x*\\1", "x*1"]:
        await pub.publish(topic, ev(topic))
    await wait_for(lambda: len(not_a) == 4 and len(star) == 1)
    await settle()
    assert not_a == ["bcd", "xyz", "x*\\1", "x*1"]
    assert star == ["x*\\1"]


async def test_glob_characters_in_the_prefix_do_not_leak_other_prefixes(make_bus: Any) -> None:
    base = f"t{uuid.uuid4().hex[:8]}"
    # Unescaped, "<base>*" as a Redis glob would also match "<base>X:…", a channel of the same length.
    starred = await make_bus(channel_prefix=f"{base}*")
    other = await make_bus(channel_prefix=f"{base}X")
    got: list[str] = []
    await starred.subscribe("a", lambda e: got.append(e.topic), pattern="a*")
    await other.publish("a1", ev("a1"))
    await starred.publish("a2", ev("a2"))
    await wait_for(lambda: got == ["a2"])
    await settle()
    assert got == ["a2"]


async def test_garbage_on_a_channel_is_logged_counted_and_skipped(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sub = await make_bus()
    got: list[str] = []
    await sub.subscribe("x", lambda e: got.append(e.topic))
    await sub.subscribe("y", lambda e: got.append(e.topic), pattern="y:*")
    prefix = sub.channel_prefix
    admin = redis.asyncio.Redis.from_url(require_redis())
    garbage: list[tuple[str | bytes, str | bytes]] = [
        (f"{prefix}:x", "not json"),
        (f"{prefix}:x", '{"type": "no-such-type", "topic": "x"}'),
        (f"{prefix}:x", "[1, 2]"),
        (f"{prefix}:x", dumps_event(ev("elsewhere"))),  # a valid event, but not of this channel's topic
        (f"{prefix}:x", b"\xff\xfe"),
        (f"{prefix}:y:1", "{}"),
        (f"{prefix}:y:\xff".encode("latin-1"), dumps_event(ev("y:1"))),  # channel name not UTF-8
        # Nesting: RecursionError in the parser, or an event that parses but nests absurdly deep.
        (f"{prefix}:x", "[" * 4000),
        (f"{prefix}:x", '{"type": "created", "topic": "x", "payload": ' + "[" * 900 + "]" * 900 + "}"),
    ]
    try:
        with caplog.at_level(logging.WARNING, logger="django_eventbus"):
            for channel, data in garbage:
                await admin.publish(channel, data)
            await admin.publish(f"{prefix}:x", dumps_event(ev("x")))
            await admin.publish(f"{prefix}:y:2", dumps_event(ev("y:2")))
            await wait_for(lambda: got == ["x", "y:2"])
    finally:
        await admin.aclose()
    assert sub.stats.invalid_messages == len(garbage)
    skipped = [r for r in caplog.records if "skipped a message" in r.getMessage()]
    assert len(skipped) == len(garbage)
    assert sub.state is ConnectionState.CONNECTED
    assert sub.stats.reconnects == 0


# -- faults, on throwaway servers -----------------------------------------------------------


async def test_unix_socket_and_acl_user(throwaway_redis: Any, make_bus: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "redis.sock")
        server = await throwaway_redis(unix_socket=path)
        admin = server.admin()
        try:
            await admin.execute_command("ACL", "SETUSER", "evt", "on", ">s3cret", "~*", "&*", "+@all")
            await admin.execute_command("ACL", "SETUSER", "default", "off")
        finally:
            await admin.aclose()
        buses = [
            await make_bus(url=f"unix://evt:s3cret@{path}?db=2"),
            await make_bus(url=server.url, username="evt", password="s3cret"),
            await make_bus(url=f"redis://evt:s3cret@127.0.0.1:{server.port}/0"),
            # explicit keys override the URL's
            await make_bus(url=f"redis://evt:wrong@127.0.0.1:{server.port}/0", password="s3cret"),
        ]
        got: list[int] = []
        await buses[0].subscribe("acl", lambda e: got.append(e.payload["i"]))
        for i, bus in enumerate(buses):
            await bus.publish("acl", ev("acl", i=i))
        await wait_for(lambda: len(got) == len(buses))
        assert got == list(range(len(buses)))
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await make_bus(url=server.url, username="evt", password="wrong")
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await make_bus(url=server.url)  # the default user is off


async def test_client_kill_pubsub_mid_stream_reconnects_and_resumes(
    throwaway_redis: Any, make_bus: Any
) -> None:
    server, pub, sub = await publisher_and_subscriber(throwaway_redis, make_bus)
    states = StateLog(sub)
    got: list[int] = []
    await sub.subscribe("stream", lambda e: got.append(e.payload["i"]))
    await sub.subscribe("stream-pattern", lambda e: None, pattern="stream*")
    stop = asyncio.Event()
    sent: list[int] = []

    async def produce() -> None:
        i = 0
        while not stop.is_set():
            await pub.publish("stream", ev("stream", i=i))
            sent.append(i)
            i += 1
            await asyncio.sleep(0.002)

    producer = asyncio.create_task(produce())
    admin = server.admin()
    try:
        await wait_for(lambda: len(got) >= 20)
        killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
        assert killed == 1
        await wait_for(lambda: states.restored == 1, what="connection restored")
        after_restore = len(sent)
        await wait_for(lambda: bool(got) and got[-1] >= after_restore + 20, what="delivery resumed")
    finally:
        stop.set()
        await producer
        await admin.aclose()
    assert states.lost == 1
    assert sub.stats.reconnects == 1
    assert sub.state is ConnectionState.CONNECTED
    assert got == sorted(set(got))  # in order, no duplicates; the gap is what the log catch-up is for


async def test_killed_publisher_connections_are_replaced_silently(
    throwaway_redis: Any, make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server, pub, sub = await publisher_and_subscriber(throwaway_redis, make_bus)
    got: list[int] = []
    await sub.subscribe("k", lambda e: got.append(e.payload["i"]))
    await pub.publish("k", ev("k", i=0))
    await pub.publish_many([ev("k", i=1), ev("k", i=2)])
    admin = server.admin()
    try:
        # both buses' publishers
        assert await admin.execute_command("CLIENT", "KILL", "TYPE", "normal") >= 2  # type: ignore[no-untyped-call]
    finally:
        await admin.aclose()
    with caplog.at_level(logging.WARNING, logger="django_eventbus"):
        start = time.monotonic()
        await pub.publish("k", ev("k", i=3))
        await pub.publish_many([ev("k", i=4), ev("k", i=5)])
        assert time.monotonic() - start < 1
    await wait_for(lambda: len(got) == 6)
    assert got == list(range(6))
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


async def test_server_restart(throwaway_redis: Any, make_bus: Any) -> None:
    server = await throwaway_redis()
    pub = await make_bus(url=server.url)
    impatient = await make_bus(url=server.url, publish_timeout=0.3)
    sub = await make_bus(url=server.url)
    states = StateLog(sub)
    got: list[str] = []

    def record(label: str) -> Callable[[Event], None]:
        # Only what is published after the restart: the outage's event may or may not arrive.
        return lambda e: got.append(f"{label} {e.topic}") if e.payload.get("after") else None

    await sub.subscribe("r", record("exact"))
    await sub.subscribe("p", record("pattern"), pattern="p:*")
    gone = await sub.subscribe("gone", record("exact"))
    before: list[Event] = []
    await sub.subscribe("r", before.append)
    await pub.publish("r", ev("r"))
    await wait_for(lambda: len(before) == 1)

    server.stop()
    await wait_for(lambda: states.lost == 1, what="connection lost")
    assert sub.state is ConnectionState.RECONNECTING
    # Subscribing and cancelling while disconnected take effect at the reconnect.
    await sub.subscribe("late", record("exact"))
    await gone.cancel()
    start = time.monotonic()
    with pytest.raises(RedisConnectionError, match="within 0.3s"):
        await impatient.publish("r", ev("r"))
    assert time.monotonic() - start < 2
    # A patient publish waits for the server (up to publish_timeout, 10 s by default).
    waiting = asyncio.create_task(pub.publish("r", ev("r", during="outage")))
    await asyncio.sleep(0.2)
    assert not waiting.done()

    await server.start()
    await waiting
    await wait_for(lambda: states.restored == 1, what="connection restored")
    assert sub.connected
    for topic in ["r", "p:1", "late", "gone"]:
        await pub.publish(topic, ev(topic, after=True))
    await wait_for(lambda: len(got) == 3)
    await settle()
    assert got == ["exact r", "pattern p:1", "exact late"]
    assert sub.stats.reconnects == 1
    assert states.lost == 1


async def test_close_while_reconnecting_is_prompt(throwaway_redis: Any) -> None:
    server = await throwaway_redis()
    bus = RedisEventBus(url=server.url)
    states = StateLog(bus)
    await bus.connect()
    await bus.subscribe("t", lambda e: None)
    server.stop()
    await wait_for(lambda: states.lost == 1, what="connection lost")
    start = time.monotonic()
    await bus.close()  # stops the reconnect loop; leaves no task or connection behind (warnings are errors)
    assert time.monotonic() - start < 1
    assert bus.state is ConnectionState.CLOSED
    assert states.restored == 0


async def test_close_during_an_outage_is_bounded_twenty_times(throwaway_redis: Any) -> None:
    # 20 buses lose their server; each is closed at another point of its reconnect loop
    # (while connecting, while backing off). Every close ends within 2 s and leaves no task.
    server = await throwaway_redis()
    buses = [RedisEventBus(url=server.url, connect_timeout=1.0) for _ in range(20)]
    for bus in buses:
        await bus.connect()
        await bus.subscribe("t", lambda e: None)
    server.kill()
    for i, bus in enumerate(buses):
        await asyncio.sleep(0.013 * i)
        start = time.monotonic()
        await asyncio.wait_for(bus.close(), 10)
        assert time.monotonic() - start < 2, f"close #{i} took {time.monotonic() - start:.2f}s"
        assert bus.state is ConnectionState.CLOSED
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("eventbus-redis")]


async def test_silent_server_is_detected_by_the_health_check(throwaway_redis: Any, make_bus: Any) -> None:
    server = await throwaway_redis()
    pub = await make_bus(url=server.url)
    sub = await make_bus(url=server.url, health_check_interval=0.2)
    states = StateLog(sub)
    got: list[str] = []
    await sub.subscribe("h", lambda e: got.append(e.event_id))
    admin = server.admin()
    try:
        # The server stops answering anyone (the TCP connection stays up): only a PING can tell.
        await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        await wait_for(lambda: states.lost == 1, timeout=5, what="connection lost")
        await wait_for(lambda: states.restored == 1, timeout=10, what="connection restored")
    finally:
        await admin.aclose()
    event = ev("h")
    await pub.publish("h", event)
    await wait_for(lambda: got == [event.event_id])


async def test_slow_subscriber_drops_locally_instead_of_being_cut_off(
    throwaway_redis: Any, make_bus: Any
) -> None:
    # A low output-buffer limit: Redis disconnects a subscriber once 256 KB wait for it.
    server = await throwaway_redis("--client-output-buffer-limit", "pubsub 256kb 128kb 1")
    total = 3000  # ~6.5 MB of events: more than the kernel's socket buffers hold for a non-reader
    pub = await make_bus(url=server.url)
    sub = await make_bus(url=server.url, queue_size=50)
    states = StateLog(sub)
    fast: list[int] = []
    slow_handled: list[int] = []

    async def slow(event: Event) -> None:
        await asyncio.sleep(0.01)
        slow_handled.append(event.payload["i"])

    await sub.subscribe("burst", slow)
    await sub.subscribe("burst", lambda e: fast.append(e.payload["i"]))
    admin = server.admin()

    async def subscribers() -> int:
        return sum("P" in c["flags"] for c in await admin.client_list())

    # The control: a subscriber on the same channel that never reads its socket.
    lazy = socket.socket()
    try:
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lazy.connect(("127.0.0.1", server.port))
        lazy.sendall(f"SUBSCRIBE {sub.channel_prefix}:burst\r\n".encode())
        await wait_for_async(lambda: returns(subscribers, 2), what="the control subscribed")
        events = [ev("burst", i=i, pad="x" * 2000) for i in range(total)]
        for first in range(0, total, 100):
            await pub.publish_many(events[first : first + 100])
        await wait_for(lambda: len(fast) == total, what="every event for the fast subscription")
        await wait_for_async(lambda: returns(subscribers, 1), what="the control cut off")
        await wait_for(lambda: len(slow_handled) + sub.stats.dropped == total, what="slow queue drained")
    finally:
        lazy.close()
        await admin.aclose()
    assert fast == list(range(total))
    assert 50 <= len(slow_handled) < total
    assert slow_handled == sorted(slow_handled)
    assert sub.stats.dropped == total - len(slow_handled)
    assert states.lost == 0
    assert sub.stats.reconnects == 0
