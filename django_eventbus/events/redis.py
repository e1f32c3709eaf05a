"""Redis pub/sub backend (``redis.asyncio``, redis-py >= 5; hiredis used when installed).

Wire format: an event is published with ``PUBLISH <channel_prefix>:<topic> <JSON>``
(:func:`~django_eventbus.events.codec.dumps_event`). Channels are binary-safe, so
topics are used as they are: ``a:b``, ``a.b``, ``A:B`` and ``ä:b`` are four channels.

Two connections per bus:

* a **subscriber** connection, read by one background task that only decodes
  and hands events to the subscriptions' bounded queues (it never runs a
  handler), so Redis never sees a slow reader and never cuts us off for
  passing ``client-output-buffer-limit pubsub``;
* a **publisher** pool, so concurrent publishes never share a connection.

redis-py's ``PubSub`` is not used: it reconnects and re-subscribes on its own,
silently, so the application would never learn that events were lost. Here a
supervisor task owns the subscriber connection: it notices the drop, fires the
"connection lost" callbacks, reconnects with :func:`~.backoff.backoff_delays`,
re-subscribes everything, and only then fires "connection restored".
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)

from .backoff import backoff_delays
from .base import BaseEventBus, ConnectionState
from .codec import dumps_event, loads_event
from .dispatch import Delivery
from .errors import BusClosedError, EventBusError
from .types import Event

__all__ = ["RedisConnectionError", "RedisEventBus", "redis_glob"]

logger = logging.getLogger("django_eventbus.events")

T = TypeVar("T")

# Keys of a redis URL's query string that configure the pool, not a connection.
_POOL_OPTIONS = ("max_connections", "timeout")
# fnmatch metacharacters: a pattern's literal head ends at the first of them.
_FNMATCH_META = frozenset("*?[")
# Characters Redis' glob matcher treats specially; escaped with a backslash in the literal head.
_GLOB_SPECIAL = frozenset("\\*?[]")
# Errors after which a publish is worth retrying: the connection, not the command, failed.
_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# ...except these, which another attempt cannot fix.
_PERMANENT = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)


class RedisConnectionError(EventBusError, ConnectionError):
    """Redis could not be reached (at ``connect``, or by ``publish`` within ``publish_timeout``)."""


@functools.lru_cache(maxsize=1024)
def redis_glob(channel_prefix: str, pattern: str) -> str:
    """The Redis PSUBSCRIBE glob that matches (at least) every channel of fnmatch ``pattern``.

    Redis' glob syntax differs from fnmatch (``[^x]`` vs ``[!x]``, backslash
    escapes), so only the pattern's literal head up to its first metacharacter
    is kept, escaped, followed by ``*``; the bus then filters with fnmatch. A
    pattern without metacharacters maps to its own (escaped) channel name.
    """
    head = pattern
    for i, char in enumerate(pattern):
        if char in _FNMATCH_META:
            head = pattern[:i]
            break
    escaped = "".join("\\" + c if c in _GLOB_SPECIAL else c for c in f"{channel_prefix}:{head}")
    return escaped + "*" if len(head) < len(pattern) else escaped


class _Route(NamedTuple):
    """Who gets an event of one topic, split by how Redis delivered it."""

    matched: tuple[Delivery, ...]  # identity of SubscriptionTable.match()'s cached tuple: our cache key
    exact: tuple[Delivery, ...]  # for a ``message`` on the topic's channel
    by_glob: dict[bytes, tuple[Delivery, ...]]  # for a ``pmessage`` of that Redis pattern


class RedisEventBus(BaseEventBus):
    """Event bus over Redis pub/sub.

    Connection options (the guide's, plus ``url`` and ``username``):

    * ``url`` -- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS) or
      ``unix:///path/redis.sock?db=0``. The base of the configuration: the keys below
      override it when given. Query arguments are redis-py's (``?ssl_cert_reqs=none``,
      ``?ssl_ca_certs=/path``, ``?client_name=web``, ``?socket_timeout=2``…).
    * ``host`` (``"127.0.0.1"``), ``port`` (``6379``), ``db`` (``0``), ``username``,
      ``password``, ``ssl`` (``False``; ``True`` switches to TLS, ``False`` turns a
      ``rediss://`` URL's TLS off).

    Bus options:

    * ``channel_prefix`` (``"events"``) -- topic ``t`` travels on channel ``<prefix>:t``.
    * ``queue_size`` (``10_000``) -- each subscription's queue; when it is full the new
      event is dropped for that subscription only and counted in ``stats.dropped``.
    * ``publish_timeout`` (``10.0`` s) -- while Redis is unreachable ``publish`` retries
      with backoff for this long, then raises :class:`RedisConnectionError`. A retry can
      publish an event twice (the first attempt may have reached Redis); consumers
      deduplicate by ``event_id``.
    * ``connect_timeout`` (``5.0`` s) -- bounds a connect, its handshake and the
      confirmation of (re)subscriptions.
    * ``health_check_interval`` (``30.0`` s, ``0`` disables) -- when the subscriber
      connection was silent this long it is PINGed; no answer within another
      interval counts as a dropped connection (a peer that vanished without a FIN).
    * ``max_connections`` (``50``) -- size of the publisher pool; more concurrent
      publishes wait for a free connection.

    Patterns use fnmatch syntax (``inventory:*``, ``a?c``, ``[!a]*``): Redis is asked
    for a superset (see :func:`redis_glob`) and the bus filters. An event reaches each
    subscription once, even when one of its exact and one of its pattern subscriptions
    both match (Redis then sends this client the message twice, and each copy is
    routed only to the subscriptions that asked for it that way).

    Connection-state callbacks and ``publish`` run on the caller's side; the reader
    never waits for them.
    """

    backend_name = "redis"

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        ssl: bool | None = None,
        password: str | None = None,
        db: int | None = None,
        username: str | None = None,
        url: str | None = None,
        channel_prefix: str = "events",
        queue_size: int = 10_000,
        publish_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        health_check_interval: float = 30.0,
        max_connections: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(channel_prefix, str) or not channel_prefix:
            raise ValueError(f"channel_prefix must be a non-empty string, got {channel_prefix!r}")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive int, got {queue_size!r}")
        self.channel_prefix = channel_prefix
        self.queue_size = queue_size
        self.publish_timeout = float(publish_timeout)
        self.connect_timeout = float(connect_timeout)
        self.health_check_interval = float(health_check_interval)

        options: dict[str, Any] = dict(parse_url(url)) if url is not None else {}
        pool_options = {key: options.pop(key) for key in _POOL_OPTIONS if key in options}
        connection_class: type[AbstractConnection] = options.pop("connection_class", Connection)
        if connection_class is UnixDomainSocketConnection:
            if host is not None or port is not None or ssl:
                raise ValueError(f"host, port and ssl do not apply to the unix socket URL {url!r}")
        else:
            options["host"] = host if host is not None else options.get("host", "127.0.0.1")
            options["port"] = int(port) if port is not None else options.get("port", 6379)
            if ssl is not None:
                connection_class = SSLConnection if ssl else Connection
            if connection_class is not SSLConnection:
                options = {k: v for k, v in options.items() if not k.startswith("ssl_")}
        if db is not None:
            options["db"] = int(db)
        if username is not None:
            options["username"] = username
        if password is not None:
            options["password"] = password
        options.setdefault("socket_connect_timeout", self.connect_timeout)
        #: The redis-py connection class and keyword arguments every connection is built with.
        self.connection_class = connection_class
        self.connection_kwargs = options
        self.max_connections = int(max_connections or pool_options.get("max_connections") or 50)

        self._prefix_bytes = f"{channel_prefix}:".encode()
        self._client: redis.asyncio.Redis | None = None
        self._conn: AbstractConnection | None = None  # the subscriber connection
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._live = False  # the subscriber connection is up and has been sent our subscriptions
        self._reads = 0  # replies read by the reader; the health check watches it move
        self._channels: dict[bytes, str] = {}  # subscribed channel -> its topic
        self._globs: dict[str, set[str]] = {}  # PSUBSCRIBEd Redis glob -> the fnmatch patterns it serves
        self._pending: dict[tuple[bytes, bytes], collections.deque[asyncio.Future[None]]] = {}
        self._routes: dict[str, _Route] = {}
        self._last_data = b""  # an exact+pattern overlap delivers one payload twice: decode it once
        self._last_event: Event | None = None

    def __repr__(self) -> str:
        db = self.connection_kwargs.get("db", 0)
        return f"<RedisEventBus {self._where()} db={db} prefix={self.channel_prefix!r} {self.state.value}>"

    def _where(self) -> str:
        kw = self.connection_kwargs
        return str(kw.get("path") or f"{kw.get('host')}:{kw.get('port')}")

    # -- lifecycle -------------------------------------------------------------

    async def _connect(self) -> None:
        pool = BlockingConnectionPool(
            connection_class=self.connection_class,
            max_connections=self.max_connections,
            timeout=self.publish_timeout,
            **self.connection_kwargs,
        )
        self._client = redis.asyncio.Redis.from_pool(pool)
        try:
            await self._client.ping()  # fail now on a wrong address or password, not at first publish
            await self._open_subscriber()
        except BaseException as exc:
            await self._close()
            if isinstance(exc, (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)):
                raise RedisConnectionError(f"cannot connect to Redis at {self._where()}: {exc}") from exc
            raise
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"eventbus-redis-supervisor-{self.channel_prefix}"
        )

    async def _close(self) -> None:
        self._live = False
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.wait({self._supervisor})
            self._supervisor = None
        await self._drop_subscriber()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()  # from_pool: closing the client closes its pool

    async def _open_subscriber(self) -> None:
        """Connect the subscriber, start its reader and (re)subscribe to everything the table needs."""
        kwargs = dict(self.connection_kwargs)
        kwargs.pop("health_check_interval", None)  # our supervisor checks health, not redis-py
        # RESP2: pub/sub messages are plain replies (RESP3 would route them as push messages);
        # no socket timeout: the reader waits for messages as long as it takes (health checks bound it).
        conn = self.connection_class(**kwargs, protocol=2, socket_timeout=None)
        try:
            await asyncio.wait_for(conn.connect(), self.connect_timeout)  # type: ignore[no-untyped-call]
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._conn = conn
        # Rebuilt from the table: subscriptions made or cancelled while disconnected count too.
        self._channels = {self._channel(topic): topic for topic in self._table.exact_topics()}
        self._globs = {}
        for pattern in self._table.patterns():
            self._globs.setdefault(redis_glob(self.channel_prefix, pattern), set()).add(pattern)
        # From here _listen() sends its own commands on this connection, so nothing is missed.
        self._live = True
        self._reader = asyncio.get_running_loop().create_task(
            self._read(conn), name=f"eventbus-redis-reader-{self.channel_prefix}"
        )
        try:
            waits: list[asyncio.Future[None]] = []
            if self._channels:
                channels = list(self._channels)
                waits += [self._expect(b"subscribe", c) for c in channels]
                await conn.send_command("SUBSCRIBE", *channels, check_health=False)
            if self._globs:
                globs = [g.encode() for g in self._globs]
                waits += [self._expect(b"psubscribe", g) for g in globs]
                await conn.send_command("PSUBSCRIBE", *globs, check_health=False)
            if waits:
                await asyncio.wait_for(asyncio.gather(*waits), self.connect_timeout)
            if self._reader.done():
                raise redis.exceptions.ConnectionError("connection lost while subscribing")
        except BaseException:
            await self._drop_subscriber()
            raise

    async def _drop_subscriber(self) -> None:
        self._live = False
        reader, self._reader = self._reader, None
        conn, self._conn = self._conn, None
        if reader is not None:
            reader.cancel()
            await asyncio.wait({reader})  # the reader handles its own errors: nothing to retrieve
        if conn is not None:
            await conn.disconnect(nowait=True)
        self._release_pending()

    # -- supervision: health checks and reconnects ------------------------------

    async def _supervise(self) -> None:
        while True:
            await self._watch()
            if self._state is ConnectionState.CLOSED:
                return
            await self._drop_subscriber()
            await self._set_state(ConnectionState.RECONNECTING)
            for delay in backoff_delays():
                try:
                    await self._open_subscriber()
                    break
                except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as exc:
                    logger.warning(
                        "redis event bus: reconnecting to %s failed (%s); next try in %.2fs",
                        self._where(),
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
            await self._set_state(ConnectionState.CONNECTED)

    async def _watch(self) -> None:
        """Return when the reader ended, i.e. the subscriber connection is gone."""
        reader, conn = self._reader, self._conn
        assert reader is not None and conn is not None
        interval = self.health_check_interval
        if interval <= 0:
            await asyncio.wait({reader})
            return
        pinged = False
        while True:
            seen = self._reads
            done, _ = await asyncio.wait({reader}, timeout=interval)
            if done:
                return
            if self._reads != seen:
                pinged = False
                continue
            if pinged:
                logger.warning(
                    "redis event bus: no answer from %s for %.1fs; reconnecting", self._where(), interval
                )
                return
            pinged = True
            try:
                await asyncio.wait_for(conn.send_command("PING", check_health=False), interval)
            except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError):
                return

    # -- reading ---------------------------------------------------------------

    async def _read(self, conn: AbstractConnection) -> None:
        read = conn.read_response
        on_reply = self._on_reply
        try:
            while True:
                try:
                    reply = await read()
                except redis.exceptions.ResponseError as exc:  # an error reply: the connection is fine
                    logger.warning("redis event bus: error reply on the subscriber connection: %s", exc)
                    continue
                self._reads += 1
                try:
                    on_reply(reply)
                except Exception:  # a bug here must not stop delivery to every subscription
                    logger.exception("redis event bus: could not route %.200r", reply)
        except Exception as exc:
            if self._state is not ConnectionState.CLOSED:
                logger.warning(
                    "redis event bus: lost the subscriber connection to %s: %s", self._where(), exc
                )
        finally:
            if self._conn is conn:
                self._live = False
            self._release_pending()

    def _on_reply(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"message":
            topic = self._channels.get(reply[1])
            if topic is not None:
                deliveries = self._route(topic).exact
                if deliveries:
                    self._deliver(deliveries, topic, reply[1], reply[2])
        elif kind == b"pmessage":
            channel: bytes = reply[2]
            try:
                topic = channel[len(self._prefix_bytes) :].decode()
            except UnicodeDecodeError:
                self._invalid(channel, reply[3], "the channel name is not UTF-8")
                return
            deliveries = self._route(topic).by_glob.get(reply[1], ())
            if deliveries:
                self._deliver(deliveries, topic, channel, reply[3])
        elif kind == b"subscribe" or kind == b"psubscribe":
            waiters = self._pending.get((kind, reply[1]))
            if waiters:
                waiter = waiters.popleft()
                if not waiters:
                    del self._pending[(kind, reply[1])]
                if not waiter.done():
                    waiter.set_result(None)
        # unsubscribe/punsubscribe confirmations and PING's "pong" need nothing.

    def _route(self, topic: str) -> _Route:
        matched = self._table.match(topic)
        route = self._routes.get(topic)
        # The table returns the same cached tuple until a subscription is added or removed.
        if route is None or route.matched is not matched:
            exact = tuple(d for d in matched if d.subscription.pattern is None)
            by_glob: dict[bytes, list[Delivery]] = {}
            for d in matched:
                if d.subscription.pattern is not None:
                    key = redis_glob(self.channel_prefix, d.subscription.pattern).encode()
                    by_glob.setdefault(key, []).append(d)
            route = _Route(matched, exact, {k: tuple(v) for k, v in by_glob.items()})
            if len(self._routes) > 4096:  # topics are unbounded (ids in them): keep the cache bounded
                self._routes.clear()
            self._routes[topic] = route
        return route

    def _deliver(self, deliveries: tuple[Delivery, ...], topic: str, channel: bytes, data: bytes) -> None:
        event = self._last_event
        if event is None or data != self._last_data:
            try:
                event = loads_event(data)
            except ValueError as exc:
                self._invalid(channel, data, str(exc))
                return
            self._last_data, self._last_event = data, event
        if event.topic != topic:
            self._invalid(channel, data, f"its topic {event.topic!r} is not the channel's")
            return
        for delivery in deliveries:
            delivery.offer(event)

    def _invalid(self, channel: bytes, data: bytes, why: str) -> None:
        self.stats.invalid_messages += 1
        logger.warning("redis event bus: skipped a message on channel %r: %s: %.200r", channel, why, data)

    # -- subscriptions ---------------------------------------------------------

    def _channel(self, topic: str) -> bytes:
        return f"{self.channel_prefix}:{topic}".encode()

    def _expect(self, kind: bytes, name: bytes) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault((kind, name), collections.deque()).append(waiter)
        return waiter

    def _release_pending(self) -> None:
        # The connection is gone: whoever waits for a confirmation stops waiting; the
        # reconnect re-subscribes from the table.
        pending, self._pending = self._pending, {}
        for waiters in pending.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _command(self, command: str, name: bytes, confirm: bytes | None) -> None:
        """Send a (un)subscribe command if connected; wait for Redis to confirm a subscribe."""
        conn = self._conn
        if not self._live or conn is None:
            return  # the reconnect subscribes to what the table holds then
        waiter = self._expect(confirm, name) if confirm is not None else None
        try:
            await conn.send_command(command, name, check_health=False)
            if waiter is not None:
                # Confirmed means a publish made after subscribe() returns reaches us.
                await asyncio.wait_for(asyncio.shield(waiter), self.connect_timeout)
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning("redis event bus: %s %r failed (%s); the reconnect will retry", command, name, exc)
        except asyncio.TimeoutError:
            logger.warning(
                "redis event bus: %s %r not confirmed in %.1fs", command, name, self.connect_timeout
            )

    async def _listen(self, topic: str, pattern: str | None) -> None:
        if pattern is None:
            channel = self._channel(topic)
            if channel not in self._channels:
                self._channels[channel] = topic
                await self._command("SUBSCRIBE", channel, b"subscribe")
            return
        glob = redis_glob(self.channel_prefix, pattern)
        users = self._globs.setdefault(glob, set())
        first = not users
        users.add(pattern)
        if first:  # two fnmatch patterns with one Redis glob share one PSUBSCRIBE
            await self._command("PSUBSCRIBE", glob.encode(), b"psubscribe")

    async def _unlisten(self, topic: str, pattern: str | None) -> None:
        if pattern is None:
            channel = self._channel(topic)
            if self._channels.pop(channel, None) is not None:
                await self._command("UNSUBSCRIBE", channel, None)
            return
        glob = redis_glob(self.channel_prefix, pattern)
        users = self._globs.get(glob)
        if users is None:
            return
        users.discard(pattern)
        if not users:
            del self._globs[glob]
            await self._command("PUNSUBSCRIBE", glob.encode(), None)

    # -- publishing ------------------------------------------------------------

    async def _send(self, events: list[Event]) -> None:
        client = self._client
        if client is None:
            raise BusClosedError("the redis event bus is not connected")
        prefix = self.channel_prefix
        if len(events) == 1:
            event = events[0]
            channel, data = f"{prefix}:{event.topic}", dumps_event(event)
            try:
                await client.publish(channel, data)
            except _PERMANENT:
                raise
            except _TRANSIENT as exc:
                await self._retry(exc, lambda c: c.publish(channel, data))
            return
        messages = [(f"{prefix}:{event.topic}", dumps_event(event)) for event in events]

        async def publish_all(c: redis.asyncio.Redis) -> None:
            # Not a transaction: one round trip, in order, and no MULTI/EXEC blocking the server.
            async with c.pipeline(transaction=False) as pipe:
                for channel, data in messages:
                    pipe.publish(channel, data)
                await pipe.execute()

        try:
            await publish_all(client)
        except _PERMANENT:
            raise
        except _TRANSIENT as exc:
            await self._retry(exc, publish_all)

    async def _retry(self, error: BaseException, attempt: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
        """Retry a failed publish with backoff until ``publish_timeout``, then raise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        logger.warning("redis event bus: publish to %s failed (%s); retrying", self._where(), error)
        for delay in backoff_delays():
            if loop.time() + delay > deadline:
                break
            await asyncio.sleep(delay)
            client = self._client
            if client is None or self._state is ConnectionState.CLOSED:
                raise BusClosedError("the redis event bus was closed while publishing") from error
            try:
                return await attempt(client)
            except _PERMANENT:
                raise
            except _TRANSIENT as exc:
                error = exc
        raise RedisConnectionError(
            f"could not publish to Redis at {self._where()} within {self.publish_timeout}s: {error}"
        ) from error
