"""Redis pub/sub backend (``redis.asyncio``, redis-py >= 5; hiredis used when installed).

Wire format: an event is published with ``PUBLISH <channel_prefix>:<topic> <JSON>``
(:func:`~django_eventbus.events.codec.dumps_event`). Channels are binary-safe, so
topics are used as they are: ``a:b``, ``a.b``, ``A:B`` and ``ä:b`` are four channels.

Two connections per bus:

* a **subscriber** connection, read by one background task that only decodes
  and hands events to the subscriptions' bounded queues (it never runs a
  handler), so Redis never sees a slow reader and never cuts us off for
  passing ``client-output-buffer-limit pubsub``;
* **publisher** connections, one per concurrent publish (up to ``max_connections``),
  so no two publishes ever share a connection.

redis-py's ``PubSub`` is not used: it reconnects and re-subscribes on its own,
silently, so the application would never learn that events were lost. Here a
supervisor task owns the subscriber connection: it notices the drop, fires the
"connection lost" callbacks, reconnects with :func:`~.backoff.backoff_delays`,
re-subscribes everything, and only then fires "connection restored".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.connection
import redis.exceptions
import redis.sentinel
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from .backoff import backoff_delays
from .base import BaseEventBus, ConnectionState
from .codec import dumps_event, loads_event
from .dispatch import Delivery
from .errors import BusClosedError, EventBusError
from .topics import redis_glob  # re-exported: tests import it from here
from .types import Event

__all__ = ["RedisConnectionError", "RedisEventBus", "parse_sentinel_url", "redis_glob"]

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # redis-py depends on async-timeout on these versions
    from async_timeout import timeout as _timeout

logger = logging.getLogger("django_eventbus.events")

# Keys of a redis URL's query string for redis-py's pool, not a connection: ours has
# max_connections too; the pool's wait ``timeout`` is publish_timeout here.
_POOL_OPTIONS = ("max_connections", "timeout")
SENTINEL_SCHEME = "redis+sentinel"
_SENTINEL_PORT = 26379
# Errors after which a publish is worth retrying: the connection, not the command, failed.
_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# ...except these, which another attempt cannot fix.
_PERMANENT = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)


class RedisConnectionError(EventBusError, ConnectionError):
    """Redis could not be reached (at ``connect``, or by ``publish`` within ``publish_timeout``)."""


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, str, str | None]:
    """``redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/<service_name>[/<db>][?…]``.

    Returns ``(sentinels, service_name, redis_url, sentinel_password)``: ``redis_url`` is the
    ``redis://`` URL of the master without its address (credentials, db, query options),
    for redis-py's ``parse_url``. The password in the URL is the master's (``AUTH`` on
    the data connections); ``?sentinel_password=…`` is the sentinels' own, if they have one.
    """
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for item in filter(None, (h.strip() for h in hosts.split(","))):
        host, port = item, _SENTINEL_PORT
        if not item.endswith("]") and ":" in item:  # "[::1]" alone has no port
            host, _, port_s = item.rpartition(":")
            try:
                port = int(port_s)
            except ValueError:
                raise ValueError(f"invalid sentinel port in {item!r} of a {SENTINEL_SCHEME}:// URL") from None
        sentinels.append((host.strip("[]"), port))
    path = [unquote(piece) for piece in parts.path.split("/") if piece]
    if not sentinels or not 1 <= len(path) <= 2:
        raise ValueError(
            f"a {SENTINEL_SCHEME}:// URL is {SENTINEL_SCHEME}://[:password@]host:port[,host:port…]"
            "/<service_name>[/<db>]"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    sentinel_password = next((v for k, v in reversed(query) if k == "sentinel_password"), None)
    rest = urlencode([(k, v) for k, v in query if k != "sentinel_password"])
    db = path[1] if len(path) > 1 else "0"
    redis_url = urlunsplit(("redis", f"{userinfo}@localhost" if at else "localhost", f"/{db}", rest, ""))
    return sentinels, path[0], redis_url, sentinel_password


def _validate_sentinels(
    sentinels: Sequence[Sequence[Any]] | None,
    service_name: str | None,
    host: str | None,
    port: int | None,
    ssl: bool | None,
) -> list[tuple[str, int]]:
    if not service_name or not isinstance(service_name, str):
        raise ValueError("Redis Sentinel needs service_name: the master's name in 'sentinel monitor'")
    if host is not None or port is not None or ssl:
        raise ValueError("host, port and ssl do not apply with sentinels: the sentinels name the master")
    try:
        pairs = [(str(host_), int(port_)) for host_, port_ in sentinels or ()]
    except (TypeError, ValueError):
        raise ValueError(f"sentinels must be a list of [host, port] pairs, got {sentinels!r}") from None
    if not pairs:
        raise ValueError("Redis Sentinel needs at least one sentinel: sentinels=[[host, port], …]")
    return pairs


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
      override it when given. Query arguments are redis-py's connection options
      (``?ssl_cert_reqs=none``, ``?ssl_ca_certs=/path``, ``?client_name=web``,
      ``?socket_connect_timeout=2``…); ``socket_timeout`` and ``health_check_interval``
      are replaced by the bus's own timeouts below, and ``protocol`` is always 2.
    * ``host`` (``"127.0.0.1"``), ``port`` (``6379``), ``db`` (``0``), ``username``,
      ``password``, ``ssl`` (``False``; ``True`` switches to TLS, ``False`` turns a
      ``rediss://`` URL's TLS off).

    Redis Sentinel (instead of ``host``/``port``; see :func:`parse_sentinel_url` for the URL form
    ``redis+sentinel://[:password@]host:port[,host:port…]/<service_name>[/<db>]``):

    * ``sentinels`` -- ``[(host, port), …]`` of the sentinels; ``service_name`` -- the
      master's name in their ``sentinel monitor`` line. Every new connection (subscriber,
      publishers) asks the sentinels for the current master, so the reconnect after a
      failover reaches the promoted replica.
    * ``sentinel_password`` -- the sentinels' ``requirepass``, if any (``password`` is the
      master's); ``sentinel_kwargs`` -- more redis-py options for the sentinel connections
      (their timeouts default to ``connect_timeout``). TLS is not supported with sentinels.

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
    * ``max_connections`` (``50``) -- publishing connections open at most; more
      concurrent publishes wait for a free one (within ``publish_timeout``).

    Patterns use fnmatch syntax (``inventory:*``, ``a?c``, ``[!a]*``): Redis is asked
    for a superset (see :func:`redis_glob`) and the bus filters. An event reaches each
    subscription once, even when one of its exact and one of its pattern subscriptions
    both match (Redis then sends this client the message twice, and each copy is
    routed only to the subscriptions that asked for it that way).

    Connection-state callbacks run on the bus's supervisor task, never on the reader:
    a slow "restored" callback (a catch-up, say) does not hold up delivery, but a slow
    "lost" callback does delay the reconnect.
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
        sentinels: Sequence[Sequence[Any]] | None = None,
        service_name: str | None = None,
        sentinel_password: str | None = None,
        sentinel_kwargs: Mapping[str, Any] | None = None,
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

        if url is not None and urlsplit(url).scheme.lower() == SENTINEL_SCHEME:
            url_sentinels, url_service, url, url_sentinel_password = parse_sentinel_url(url)
            sentinels = url_sentinels if sentinels is None else sentinels
            service_name = service_name or url_service
            if sentinel_password is None:
                sentinel_password = url_sentinel_password
        #: ``[(host, port), …]`` of the sentinels, or None when the bus talks to one server.
        self.sentinels: list[tuple[str, int]] | None = None
        self.service_name = service_name
        self.sentinel_kwargs: dict[str, Any] = {}
        if sentinels is not None or service_name is not None:
            self.sentinels = _validate_sentinels(sentinels, service_name, host, port, ssl)
            self.sentinel_kwargs = {
                "socket_connect_timeout": self.connect_timeout,
                "socket_timeout": self.connect_timeout,
                **({"password": sentinel_password} if sentinel_password is not None else {}),
                **(sentinel_kwargs or {}),
            }
        self._sentinel: Sentinel | None = None
        self._sentinel_pool: SentinelConnectionPool | None = None

        options: dict[str, Any] = dict(parse_url(url)) if url is not None else {}
        pool_options = {key: options.pop(key) for key in _POOL_OPTIONS if key in options}
        connection_class: type[AbstractConnection] = options.pop("connection_class", Connection)
        if self.sentinels is not None:
            if connection_class is not Connection:
                raise ValueError("TLS and unix sockets are not supported with Redis Sentinel")
            # Each connection learns the master's address from the sentinels when it connects.
            connection_class = SentinelManagedConnection
            options.pop("host", None)
            options.pop("port", None)
        elif connection_class is UnixDomainSocketConnection:
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
        # RESP2: pub/sub messages are plain replies (RESP3 would route them as push messages).
        options["protocol"] = 2
        # No per-operation socket timeout (it costs a task per write): the reader waits for
        # messages as long as it takes (health checks bound that), a publish has one deadline.
        options["socket_timeout"] = None
        options.pop("health_check_interval", None)  # our supervisor checks health, not redis-py
        #: The redis-py connection class and keyword arguments every connection is built with.
        self.connection_class = connection_class
        self.connection_kwargs = options
        self.max_connections = int(max_connections or pool_options.get("max_connections") or 50)

        self._prefix_bytes = f"{channel_prefix}:".encode()
        self._publisher: _Publisher | None = None
        self._conn: AbstractConnection | None = None  # the subscriber connection
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False  # set by close(): the supervisor must not reconnect after it
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
        if self.sentinels is not None:
            via = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"the master of {self.service_name!r} (sentinels {via})"
        kw = self.connection_kwargs
        return str(kw.get("path") or f"{kw.get('host')}:{kw.get('port')}")

    # -- lifecycle -------------------------------------------------------------

    async def _connect(self) -> None:
        if self.sentinels is not None:
            # No I/O here: the sentinels are asked when a connection connects.
            self._sentinel = Sentinel(self.sentinels, sentinel_kwargs=self.sentinel_kwargs)  # type: ignore[no-untyped-call, unused-ignore]
            self._sentinel_pool = SentinelConnectionPool(self.service_name, self._sentinel)  # type: ignore[no-untyped-call]
        self._publisher = _Publisher(self._new_connection, self.max_connections)
        try:
            async with _timeout(self.connect_timeout):
                # Fail now on a wrong address or password, not at the first publish.
                await self._publisher.execute([("PING",)])
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
        self._closing = True
        self._live = False
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            # A cancellation can be swallowed by a wait_for() inside redis-py whose inner
            # awaitable finished at the same moment (Python 3.11): cancel again until the
            # task is really gone. The closing flag stops it at its next loop turn anyway.
            while not supervisor.done():
                supervisor.cancel()
                await asyncio.wait({supervisor}, timeout=0.1)
        await self._drop_subscriber()
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            await publisher.close()
        sentinel, self._sentinel, self._sentinel_pool = self._sentinel, None, None
        if sentinel is not None:
            # Bounded: close() must return while a sentinel is unreachable, and these
            # connections carry nothing that needs a clean goodbye.
            with contextlib.suppress(asyncio.TimeoutError, redis.exceptions.RedisError, OSError):
                async with _timeout(1.0):
                    for client in sentinel.sentinels:
                        await client.aclose()

    def _new_connection(self) -> AbstractConnection:
        if self._sentinel_pool is not None:
            return SentinelManagedConnection(connection_pool=self._sentinel_pool, **self.connection_kwargs)  # type: ignore[no-untyped-call]
        if self.sentinels is not None:
            raise BusClosedError("the redis event bus is not connected")
        return self.connection_class(**self.connection_kwargs)

    async def _open_subscriber(self) -> None:
        """Connect the subscriber, start its reader and (re)subscribe to everything the table needs."""
        conn = self._new_connection()
        try:
            async with _timeout(self.connect_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
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
                async with _timeout(self.connect_timeout):
                    await asyncio.gather(*waits)
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
        while not self._stopping():
            await self._watch()
            if self._stopping():
                return
            await self._drop_subscriber()
            await self._set_state(ConnectionState.RECONNECTING)
            for delay in backoff_delays():
                if self._stopping():
                    return
                try:
                    await self._open_subscriber()
                    break
                except Exception as exc:  # whatever it was, giving up would end delivery for good
                    logger.warning(
                        "redis event bus: reconnecting to %s failed (%r); next try in %.2fs",
                        self._where(),
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
            await self._set_state(ConnectionState.CONNECTED)
            await self._unlisten_cancelled()

    def _stopping(self) -> bool:
        # A method, not the attribute inline: close() sets it while the loop awaits.
        return self._closing or self._state is ConnectionState.CLOSED

    async def _unlisten_cancelled(self) -> None:
        """Drop what was cancelled while reconnecting (the base calls ``_unlisten`` only when connected)."""
        # Each time the bookkeeping, then the command, with no await in between: a subscribe
        # made meanwhile finds the name gone and subscribes it again, after this command.
        channels = [c for c, topic in self._channels.items() if not self._table.has_topic(topic)]
        for channel in channels:
            del self._channels[channel]
        if channels:
            await self._command("UNSUBSCRIBE", *channels)
        patterns = self._table.patterns()
        globs = [glob for glob, users in self._globs.items() if not users & patterns]
        for users in self._globs.values():
            users &= patterns
        for glob in globs:
            del self._globs[glob]
        if globs:
            await self._command("PUNSUBSCRIBE", *(glob.encode() for glob in globs))

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
                async with _timeout(interval):
                    await conn.send_command("PING", check_health=False)
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
                if not self._reads & 31:
                    # A burst already buffered is read without ever suspending: let the
                    # subscriptions' workers run now and then, so small queues keep up.
                    await asyncio.sleep(0)
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

    async def _command(self, command: str, *names: bytes, confirm: bytes | None = None) -> None:
        """Send a (un)subscribe command if connected; wait for Redis to confirm a subscribe of one name."""
        conn = self._conn
        if not self._live or conn is None:
            return  # the reconnect subscribes to what the table holds then
        waiter = self._expect(confirm, names[-1]) if confirm is not None else None
        try:
            await conn.send_command(command, *names, check_health=False)
            if waiter is not None:
                # Confirmed means a publish made after subscribe() returns reaches us.
                async with _timeout(self.connect_timeout):
                    await asyncio.shield(waiter)
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning(
                "redis event bus: %s %r failed (%s); the reconnect will retry", command, names, exc
            )
        except asyncio.TimeoutError:
            logger.warning(
                "redis event bus: %s %r not confirmed in %.1fs", command, names, self.connect_timeout
            )

    async def _listen(self, topic: str, pattern: str | None) -> None:
        if pattern is None:
            channel = self._channel(topic)
            if channel not in self._channels:
                self._channels[channel] = topic
                await self._command("SUBSCRIBE", channel, confirm=b"subscribe")
            return
        glob = redis_glob(self.channel_prefix, pattern)
        users = self._globs.setdefault(glob, set())
        first = not users
        users.add(pattern)
        if first:  # two fnmatch patterns with one Redis glob share one PSUBSCRIBE
            await self._command("PSUBSCRIBE", glob.encode(), confirm=b"psubscribe")

    async def _unlisten(self, topic: str, pattern: str | None) -> None:
        if pattern is None:
            channel = self._channel(topic)
            if self._channels.pop(channel, None) is not None:
                await self._command("UNSUBSCRIBE", channel)
            return
        glob = redis_glob(self.channel_prefix, pattern)
        users = self._globs.get(glob)
        if users is None:
            return
        users.discard(pattern)
        if not users:
            del self._globs[glob]
            await self._command("PUNSUBSCRIBE", glob.encode())

    # -- publishing ------------------------------------------------------------

    async def _send(self, events: list[Event]) -> None:
        publisher = self._publisher
        if publisher is None:
            raise BusClosedError("the redis event bus is not connected")
        prefix = self.channel_prefix
        commands = [("PUBLISH", f"{prefix}:{event.topic}", dumps_event(event)) for event in events]
        errors: list[BaseException] = []
        try:
            # One deadline for the whole publish, retries included (cheaper than one per socket operation).
            async with _timeout(self.publish_timeout):
                await self._execute(publisher, commands, errors)
        except asyncio.TimeoutError as exc:
            cause = errors[-1] if errors else exc
            raise RedisConnectionError(
                f"could not publish to Redis at {self._where()} within {self.publish_timeout}s: {cause!r}"
            ) from cause

    async def _execute(
        self, publisher: _Publisher, commands: list[tuple[str, str, str]], errors: list[BaseException]
    ) -> None:
        delays = backoff_delays()
        while True:
            try:
                return await publisher.execute(commands)
            except _PERMANENT:
                raise
            except _TRANSIENT as exc:
                errors.append(exc)
            if len(errors) == 1:
                where = self._where()
                logger.warning("redis event bus: publish to %s failed (%s); retrying", where, errors[-1])
            # A retry may publish twice (the failed attempt may have reached Redis): consumers
            # dedup by id.
            await asyncio.sleep(next(delays))
            if self._publisher is not publisher:
                raise BusClosedError("the redis event bus was closed while publishing") from errors[-1]


class _Publisher:
    """The publishing connections: each runs one publish (or one pipeline) at a time.

    redis-py's client and pool cost more than the loopback round trip of a PUBLISH
    (a task per socket write for ``socket_timeout``, pool locks, observability hooks);
    a free list of plain connections does the same job. No per-operation timeouts:
    the bus puts one deadline around the whole publish.
    """

    def __init__(self, factory: Callable[[], AbstractConnection], max_connections: int) -> None:
        self._factory = factory
        self._idle: list[AbstractConnection] = []
        self._open: set[AbstractConnection] = set()
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    async def execute(self, commands: list[tuple[str, str, str]] | list[tuple[str]]) -> None:
        """Send the commands in one write and read every reply; the first error reply is raised."""
        async with self._slots:
            if self._closed:  # a publish that waited for a slot while the bus closed
                raise redis.exceptions.ConnectionError("the publisher is closed")
            while self._idle:
                try:
                    return await self._run(self._idle.pop(), commands)
                except (redis.exceptions.ConnectionError, OSError):
                    # Most likely the server closed this idle connection (CLIENT KILL, its idle
                    # `timeout`, a restart): the command never ran. Go on with the next one.
                    continue
            conn = self._factory()
            self._open.add(conn)
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                self._open.discard(conn)
                await conn.disconnect(nowait=True)
                raise
            return await self._run(conn, commands)

    async def _run(
        self, conn: AbstractConnection, commands: list[tuple[str, str, str]] | list[tuple[str]]
    ) -> None:
        error: redis.exceptions.ResponseError | None = None
        try:
            if len(commands) == 1:
                await conn.send_packed_command(conn.pack_command(*commands[0]), check_health=False)
            else:
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            for _ in commands:
                try:
                    await conn.read_response()
                except redis.exceptions.ResponseError as exc:  # an error reply: the connection is in step
                    error = error or exc
        except BaseException:
            # Replies may be left unread or the socket is broken: never reuse this connection.
            self._open.discard(conn)
            await conn.disconnect(nowait=True)
            raise
        if self._closed:
            await conn.disconnect(nowait=True)
        else:
            self._idle.append(conn)
        if error is not None:
            raise error

    async def close(self) -> None:
        self._closed = True
        conns, self._open, self._idle = self._open, set(), []
        for conn in conns:
            await conn.disconnect(nowait=True)
