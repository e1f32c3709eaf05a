"""PostgreSQL backend: events travel through ``LISTEN``/``NOTIFY`` (psycopg 3, asyncio).

How topics map to PostgreSQL
----------------------------
A bus uses **one** NOTIFY channel, named by ``channel_prefix`` (default ``"events"``).
The topic travels inside the JSON payload and each listening process picks the
events its subscriptions want from its local subscription table. So:

* topics never collide and need no sanitising (``a:b``, ``a.b``, ``ä:b`` and a
  300-character topic are all distinct), and they have no 63-byte limit;
* pattern subscriptions (``inventory:*``) see every topic they match;
* per topic, events arrive in commit order (one channel, one queue).

The price: every process listening on a prefix receives, and decodes, every
event published under that prefix, also the ones no local subscription wants.
Give unrelated traffic its own ``channel_prefix`` when that matters.

Payload size
------------
PostgreSQL refuses NOTIFY payloads of 8000 bytes or more. An encoded event up to
:data:`MAX_PAYLOAD_BYTES` goes out whole; a larger one is split into chunk frames
that are all sent in one transaction (so they arrive together, or not at all)
and reassembled by the listener. PostgreSQL drops a notification that repeats an
earlier (channel, payload) pair of the same transaction, so every frame carries
its index and its event's key (the event id, or a random one if the id is longer
than 64 bytes) and is therefore unique. A frame is
``"\\x1echunk:<index>:<count>:<length of key>:<key><piece of the JSON>"``; no frame is
cut inside a UTF-8 character.

Delivery is what LISTEN/NOTIFY gives: events published while a listener is
disconnected do not reach it. The bus says so through
``on_connection_lost``/``on_connection_restored`` (the Django layer then catches
up from its event log). A publish retried after a dropped connection may have
been committed before the drop, so an event can arrive twice; consumers dedupe by
``event_id``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from .backoff import backoff_delays
from .base import BaseEventBus, ConnectionState
from .codec import dumps_event, loads_event
from .errors import BusClosedError, EventBusError, EventSerializationError
from .types import Event

__all__ = ["MAX_PAYLOAD_BYTES", "PostgresEventBus"]

logger = logging.getLogger("django_eventbus.events")

#: Largest NOTIFY payload we send. PostgreSQL's limit is "shorter than 8000 bytes" in
#: the server encoding; the margin covers servers whose encoding is not UTF-8.
MAX_PAYLOAD_BYTES = 7900
_CHUNK_MARK = "\x1echunk:"  # a JSON event starts with "{", so this prefix cannot be one
_MAX_NOTIFIES_PER_STATEMENT = 1000  # 2 parameters each; the protocol allows 65535
_NOTIFY_ONE = "SELECT pg_notify(%s, %s)"

# Connection parameters we set unless the connection string does: keepalives notice a
# silently dead peer (no FIN/RST) within about a minute instead of the OS's two hours.
_DEFAULT_PARAMS: dict[str, Any] = {
    "application_name": "django-eventbus",
    "client_encoding": "UTF8",
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

AsyncConn = psycopg.AsyncConnection[Any]
AsyncCursor = psycopg.AsyncCursor[Any]


@functools.lru_cache(maxsize=64)
def _notify_many_sql(count: int) -> str:
    # Only placeholders are formatted in; one statement is one round trip and one
    # implicit transaction, and PostgreSQL evaluates the select list left to right.
    return "SELECT " + ", ".join(["pg_notify(%s, %s)"] * count)


class _Partial:
    """The chunks of one large event received so far."""

    __slots__ = ("count", "parts", "started")

    def __init__(self, count: int) -> None:
        self.count = count
        self.parts: dict[int, str] = {}
        self.started = time.monotonic()


class PostgresEventBus(BaseEventBus):
    """Event bus over PostgreSQL ``LISTEN``/``NOTIFY``.

    Options (the keys of the ``create_event_bus`` config):

    ``connection_string`` (required)
        A libpq URL (``postgresql://user:pass@host:5432/db``) or ``key=value`` string.
        Unless it sets them, the bus adds TCP keepalives, ``connect_timeout=10`` and
        ``client_encoding=UTF8``. Its two connections are named
        ``"<application_name>:listen"`` and ``"<application_name>:publish"``
        (``application_name`` defaults to ``django-eventbus``) in ``pg_stat_activity``.
    ``listen_connection_string`` (default: ``connection_string``)
        The conninfo of the LISTEN connection only. Behind PgBouncer in transaction
        pooling mode (where LISTEN cannot work: the session that ran it goes back to the
        pool after the statement), point ``connection_string`` at PgBouncer and this at
        PostgreSQL itself, so only the one long-lived listening session bypasses the pooler.
        The same defaults are added to it.
    ``channel_prefix`` (default ``"events"``)
        The one NOTIFY channel of this bus (an identifier: at most 63 bytes; any
        characters, it is always quoted). Buses with the same prefix on the same
        database see each other's events.
    ``queue_size`` (default 10 000)
        Length of each subscription's queue; when it is full, new events for that
        subscription are dropped, logged and counted in ``stats.dropped``.
    ``publish_timeout`` (default 10 s)
        How long ``publish`` retries, reconnecting with backoff, when the database
        connection fails, before it raises :class:`EventBusError`.

    The bus opens two connections. One listens: it is opened at the first subscription,
    runs only ``LISTEN`` in autocommit mode and so never sits in a transaction (which
    would make the server's notification queue grow). The other runs ``pg_notify`` for
    every publisher of the bus, one at a time under a lock, so that a dropped connection
    is replaced once rather than by each waiting publisher.

    ``channel`` is the NOTIFY channel name (``channel_prefix``, validated).
    """

    backend_name = "postgres"
    #: Seconds after which the chunks of an incomplete large event are discarded.
    chunk_timeout = 30.0
    #: Incomplete large events kept at once (one transaction's chunks arrive together,
    #: so more than one only happens when frames were lost or forged).
    max_partial_events = 64

    def __init__(
        self,
        connection_string: str,
        channel_prefix: str = "events",
        queue_size: int = 10_000,
        publish_timeout: float = 10.0,
        listen_connection_string: str | None = None,
    ) -> None:
        super().__init__()
        params = _conninfo_params(connection_string, "connection_string")
        listen_params = (
            params
            if listen_connection_string is None
            else _conninfo_params(listen_connection_string, "listen_connection_string")
        )
        self.channel = _validate_channel(channel_prefix)
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive int, got {queue_size!r}")
        if publish_timeout <= 0:
            raise ValueError(f"publish_timeout must be > 0 seconds, got {publish_timeout!r}")
        self._params = _with_defaults(params)
        self._listen_params = _with_defaults(listen_params)
        self.queue_size = queue_size
        self.publish_timeout = float(publish_timeout)
        self._listen_sql = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))

        # A cursor kept for the publish connection (its .connection): cheaper than
        # conn.execute(), which makes a new cursor per call.
        self._publisher: AsyncCursor | None = None
        self._publish_lock = asyncio.Lock()
        self._listen_conn: AsyncConn | None = None
        self._listener_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._partial: dict[str, _Partial] = {}

    # -- encoding ------------------------------------------------------------

    def notifications_for(self, event: Event) -> list[tuple[str, str]]:
        """The ``(channel, payload)`` pairs that publish ``event``, in order.

        Run each with ``SELECT pg_notify(%s, %s)``, all in **one** transaction (a large
        event is several chunks that must arrive together). The Django layer runs them on
        its own connection inside the model's transaction, so they are delivered at commit
        and never for a rollback. Raises :class:`EventSerializationError` when the event
        cannot travel as JSON.
        """
        payload = dumps_event(event)
        try:
            data = payload.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate survives json.dumps(ensure_ascii=False)
            raise EventSerializationError(
                f"event {event.event_id} on topic {event.topic!r} is not valid UTF-8 text: {exc}"
            ) from None
        if len(data) <= MAX_PAYLOAD_BYTES:
            return [(self.channel, payload)]
        return [(self.channel, frame) for frame in _chunk_frames(event.event_id, data)]

    # -- transport hooks -------------------------------------------------------

    async def _connect(self) -> None:
        self._publisher = (await self._open("publish")).cursor()
        if len(self._table):
            try:
                await self._start_listener()
            except BaseException:
                await _close_quietly(self._publisher.connection)
                self._publisher = None
                raise

    async def _close(self) -> None:
        self._closed.set()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        listen_conn, self._listen_conn = self._listen_conn, None
        await _close_quietly(listen_conn)
        # Under the lock: closing a connection another task is waiting on would hang that task.
        async with self._publish_lock:
            publisher, self._publisher = self._publisher, None
            await _close_quietly(publisher.connection if publisher is not None else None)
        self._partial.clear()

    async def _listen(self, topic: str, pattern: str | None) -> None:
        # One channel carries every topic: the first subscription starts the listener,
        # later ones only add a row to the local subscription table.
        await self._start_listener()

    async def _unlisten(self, topic: str, pattern: str | None) -> None:
        # The LISTEN stays until close(); events nobody here wants are decoded and dropped.
        pass

    async def _send(self, events: list[Event]) -> None:
        if len(events) == 1:
            pairs = self.notifications_for(events[0])
        else:
            pairs = [pair for event in events for pair in self.notifications_for(event)]
        # The deadline starts before the lock: publishers queued behind a failing one
        # give up together instead of one publish_timeout each.
        deadline = time.monotonic() + self.publish_timeout
        delays: Iterator[float] | None = None
        async with self._publish_lock:
            while True:
                if self._closed.is_set():
                    raise BusClosedError("the postgres event bus was closed during publish")
                publisher = self._publisher
                reused = publisher is not None
                try:
                    if publisher is None:
                        publisher = self._publisher = (await self._open("publish")).cursor()
                    await _notify(publisher, pairs)
                    return
                except psycopg.OperationalError as exc:
                    if publisher is not None and publisher.connection.closed:
                        self._publisher = None
                    if reused and self._publisher is None and delays is None:
                        # An idle connection was dropped (server restart, pg_terminate_backend,
                        # an idle timeout): a new one usually works at once, so no wait first.
                        logger.warning("postgres event bus: publish connection lost (%s); reconnecting", exc)
                        delays = backoff_delays()
                        continue
                    delays = delays or backoff_delays()
                    delay = next(delays)
                    if time.monotonic() + delay > deadline:
                        raise EventBusError(
                            f"could not publish to PostgreSQL within {self.publish_timeout:g}s: {exc}"
                        ) from exc
                    logger.warning("postgres event bus: publish failed (%s); retrying in %.2fs", exc, delay)
                    with suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._closed.wait(), delay)

    # -- connections -----------------------------------------------------------

    async def _open(self, role: str) -> AsyncConn:
        base = self._listen_params if role == "listen" else self._params
        params = dict(base, application_name=f"{base['application_name']}:{role}")
        # prepare_threshold=None: psycopg 3 turns a query run 5 times into a server-side
        # prepared statement, and PgBouncer before 1.21 in transaction mode hands the next
        # transaction to another server session, where that statement does not exist
        # ("prepared statement "_pg3_0" does not exist"). pg_notify gains nothing from it.
        return await psycopg.AsyncConnection.connect(autocommit=True, prepare_threshold=None, **params)

    async def _open_listener(self) -> AsyncConn:
        conn = await self._open("listen")
        # Notifications psycopg reads while it runs LISTEN come here, not into its backlog.
        conn.add_notify_handler(lambda notify: self._receive(notify.payload))
        try:
            await conn.execute(self._listen_sql)
        except BaseException:
            await _close_quietly(conn)
            raise
        return conn

    async def _start_listener(self) -> None:
        async with self._listener_lock:
            if self._reader is None:
                conn = await self._open_listener()
                if self._closed.is_set():  # close() ran while this subscribe was connecting
                    await _close_quietly(conn)
                    raise BusClosedError("the postgres event bus was closed during subscribe")
                self._listen_conn = conn
                self._reader = asyncio.get_running_loop().create_task(
                    self._read(self._listen_conn), name=f"eventbus-postgres-listen-{self.channel}"
                )

    async def _read(self, conn: AsyncConn | None) -> None:
        """Read notifications until close(); reconnect whenever the connection fails."""
        loop = asyncio.get_running_loop()
        while conn is not None:
            lost: asyncio.Future[Exception] = loop.create_future()
            fd = conn.fileno()
            loop.add_reader(fd, self._on_readable, conn, conn.info.encoding, lost)
            try:
                self._on_readable(conn, conn.info.encoding, lost)  # input that came with the LISTEN reply
                exc = await lost
            finally:
                loop.remove_reader(fd)
            logger.warning("postgres event bus: listener connection failed: %s", exc)
            await _close_quietly(conn)
            conn = await self._reconnect_listener()

    def _on_readable(self, conn: AsyncConn, encoding: str, lost: asyncio.Future[Exception]) -> None:
        # libpq's documented pattern for notifications on an idle connection (wait for the
        # socket, PQconsumeInput, PQnotifies), run from the loop's reader callback: unlike
        # psycopg's notifies() generator it needs no task switch, future, timer or
        # add/remove_reader per wake-up: notifies() was measured slower on bursts of
        # notifications (bench/README.md, "One path per job"). No command ever runs on
        # this connection after LISTEN, so going around psycopg's connection lock is safe.
        if lost.done():
            return
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:  # the connection is gone (EOF, reset, terminated)
            lost.set_result(exc)
            return
        payloads = []
        while (notify := pgconn.notifies()) is not None:
            payloads.append(notify.extra)
        if payloads:
            # Decode on the next loop iteration, not in this callback: a publisher on the
            # same loop whose reply arrived together with these notifications sends its
            # next command first, and decoding overlaps with the server's work (decoding
            # right here was measurably slower in bench/bench_postgres.py).
            asyncio.get_running_loop().call_soon(self._receive_all, payloads, encoding)

    async def _reconnect_listener(self) -> AsyncConn | None:
        """A new listening connection, or None once the bus is closed."""
        if self._partial:
            logger.warning(
                "postgres event bus: discarding %d incomplete large event(s) after a disconnect",
                len(self._partial),
            )
            self._partial.clear()
        self._listen_conn = None
        if self._state is ConnectionState.CONNECTED:
            await self._set_state(ConnectionState.RECONNECTING)
        attempt = 0
        for delay in backoff_delays():
            # A "connection lost" callback may have closed the bus from within this task.
            if self._closed.is_set():
                return None
            await asyncio.sleep(delay)
            attempt += 1
            try:
                conn = await self._open_listener()
            except psycopg.Error as exc:
                logger.warning("postgres event bus: reconnect attempt %d failed: %s", attempt, exc)
                continue
            self._listen_conn = conn
            if self._state is ConnectionState.RECONNECTING:
                # LISTEN is active again: whatever the "restored" callbacks catch up on,
                # later events arrive live.
                await self._set_state(ConnectionState.CONNECTED)
            return None if self._closed.is_set() else conn
        raise AssertionError("backoff_delays() is endless")  # pragma: no cover

    # -- receiving -------------------------------------------------------------

    def _receive_all(self, payloads: list[bytes], encoding: str) -> None:
        for payload in payloads:
            try:
                text = payload.decode(encoding)
            except UnicodeDecodeError as exc:  # only if the connection string set another client_encoding
                self._invalid(f"cannot decode the payload as {encoding}: {exc}")
                continue
            self._receive(text)

    def _receive(self, payload: str) -> None:
        if payload.startswith(_CHUNK_MARK):
            whole = self._reassemble(payload)
            if whole is None:
                return
            payload = whole
        try:
            event = loads_event(payload)
        except Exception as exc:  # ValueError mostly; RecursionError for absurdly nested JSON
            self._invalid(f"{exc} (payload {payload[:80]!r})")
            return
        self._dispatch_queued(event)

    def _invalid(self, why: str) -> None:
        self.stats.invalid_messages += 1
        logger.warning("postgres event bus: ignored a message on channel %r: %s", self.channel, why)

    def _reassemble(self, frame: str) -> str | None:
        """Store one chunk; return the whole payload once its last chunk is in."""
        try:
            _, index_s, count_s, key_len_s, rest = frame.split(":", 4)
            index, count, key_len = int(index_s), int(count_s), int(key_len_s)
            if not (0 <= index < count and 0 <= key_len <= len(rest)):
                raise ValueError("index or length out of range")
        except ValueError as exc:
            self._invalid(f"malformed chunk frame ({exc}): {frame[:80]!r}")
            return None
        key, data = rest[:key_len], rest[key_len:]
        partial = self._partial.get(key)
        if partial is None or partial.count != count:
            if partial is not None:
                del self._partial[key]
                self._invalid(f"chunk count of large event {key} changed from {partial.count} to {count}")
            self._expire_partials()
            partial = self._partial[key] = _Partial(count)
        partial.parts[index] = data
        if len(partial.parts) < count:
            return None
        del self._partial[key]
        return "".join(partial.parts[i] for i in range(count))

    def _expire_partials(self) -> None:
        now = time.monotonic()
        # Insertion order is age order, so the oldest come first.
        for key, partial in list(self._partial.items()):
            too_many = len(self._partial) >= self.max_partial_events
            if not too_many and now - partial.started < self.chunk_timeout:
                break
            del self._partial[key]
            self._invalid(
                f"discarded incomplete large event {key} ({len(partial.parts)} of {partial.count} chunks)"
            )


def _conninfo_params(conninfo: object, name: str) -> dict[str, Any]:
    if not isinstance(conninfo, str):
        raise ValueError(f"{name} must be a libpq URL or key=value string")
    try:
        return conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        # The connection string itself is not repeated: it may hold a password.
        raise ValueError(f"invalid PostgreSQL {name}: {exc}") from None


def _with_defaults(params: dict[str, Any]) -> dict[str, Any]:
    params = {**_DEFAULT_PARAMS, **params}
    # Leave room for the ":listen" suffix inside PostgreSQL's 63-byte NAMEDATALEN.
    name = str(params["application_name"]).encode()[:54]
    params["application_name"] = name.decode("utf-8", errors="ignore")
    return params


def _validate_channel(channel: object) -> str:
    if not isinstance(channel, str) or not channel:
        raise ValueError(f"channel_prefix must be a non-empty string, got {channel!r}")
    if len(channel.encode("utf-8")) > 63:
        raise ValueError(
            f"channel_prefix {channel!r} is {len(channel.encode('utf-8'))} bytes in UTF-8; PostgreSQL "
            "channel names are identifiers of at most 63 bytes: choose a shorter prefix"
        )
    if "\x00" in channel:
        raise ValueError("channel_prefix must not contain NUL characters")
    return channel


def _chunk_frames(event_id: str, data: bytes) -> list[str]:
    """Split an encoded event into frames of at most MAX_PAYLOAD_BYTES bytes each."""
    # The event id names the chunks in logs; an absurdly long one is replaced so the
    # header stays small. Either way the key is unique to this event.
    key = event_id if len(event_id.encode("utf-8")) <= 64 else uuid.uuid4().hex
    # There are never more chunks than bytes, so len(str(len(data))) digits always fit.
    digits = len(str(len(data)))
    room = MAX_PAYLOAD_BYTES - len(f"{_CHUNK_MARK}::{len(key)}:{key}".encode()) - 2 * digits
    pieces: list[str] = []
    start, total = 0, len(data)
    while start < total:
        end = min(start + room, total)
        # Cut on a character boundary: never before a UTF-8 continuation byte (10xxxxxx).
        while end < total and data[end] & 0xC0 == 0x80:
            end -= 1
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    count = len(pieces)
    return [f"{_CHUNK_MARK}{i}:{count}:{len(key)}:{key}{piece}" for i, piece in enumerate(pieces)]


async def _notify(cur: AsyncCursor, pairs: list[tuple[str, str]]) -> None:
    if len(pairs) == 1:
        await cur.execute(_NOTIFY_ONE, pairs[0])
        return
    if len(pairs) <= _MAX_NOTIFIES_PER_STATEMENT:
        await cur.execute(_notify_many_sql(len(pairs)), [value for pair in pairs for value in pair])
        return
    # Several statements: one transaction keeps a large event's chunks together.
    async with cur.connection.transaction():
        for start in range(0, len(pairs), _MAX_NOTIFIES_PER_STATEMENT):
            piece = pairs[start : start + _MAX_NOTIFIES_PER_STATEMENT]
            await cur.execute(_notify_many_sql(len(piece)), [value for pair in piece for value in pair])


async def _close_quietly(conn: AsyncConn | None) -> None:
    if conn is not None:
        try:
            await conn.close()
        except psycopg.Error as exc:
            logger.debug("postgres event bus: error closing a connection: %s", exc)
