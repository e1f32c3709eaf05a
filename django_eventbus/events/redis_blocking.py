"""The Redis backend's blocking publisher: PUBLISH from a thread that has no event loop.

Django publishes after commit from request threads. Handing each commit to the
bus's event-loop thread cost ~200 µs of CPU per event on the 2-core machine this
was measured on (a cross-thread wake-up, a task, asyncio's socket handling, then
the reply) — more than the publish itself, and it competes with the request for
the CPU. This publisher writes the PUBLISH commands to a plain socket from the
calling thread instead.

It does not wait for the replies (integers: how many subscribers got each
message, or an error such as OOM): they are read in bulk once a few hundred are
pending (errors are logged then), and before writing on a connection that sat
idle for a second, where a connection the server closed in the meantime (its
idle ``timeout``, a restart) shows up as EOF and is replaced before anything is
written to it.
A write the kernel accepted on a connection that dies afterwards is lost to
pub/sub — as it would be on any pub/sub client; that is what the event log and
the listeners' catch-up are for.

Failures raise :class:`RedisConnectionError`; the caller (the Django layer's
runner) then hands the events to the bus's asynchronous path, which retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

import redis.exceptions
from redis.connection import AbstractConnection

from .codec import dumps_event
from .errors import EventBusError
from .types import Event

__all__ = ["BlockingPublisher"]

logger = logging.getLogger("django_eventbus.events.redis")

# Read what replies have arrived once this many are pending (polling the socket on
# every publish cost as much as the write), and all of them (blocking) past _MAX_UNREAD:
# a bound on what sits in the socket buffers, and on how late an error is noticed.
_READ_UNREAD = 256
_MAX_UNREAD = 4096
# Check a connection for EOF before writing on it after this long without a write.
_IDLE_CHECK = 1.0


def _publish_command(channel: bytes, message: bytes) -> bytes:
    # RESP by hand: a PUBLISH is two bulk strings, and redis-py's general packer
    # (type checks and encoding per argument) cost more than the socket write here.
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(channel),
        channel,
        len(message),
        message,
    )


class BlockingPublisher:
    """One socket, shared by the threads of a process behind a lock."""

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        channel_prefix: str,
        check: Callable[[str, Event], None],
        on_published: Callable[[int], None],
        error: Callable[[str], EventBusError],
    ) -> None:
        self._connect = connect
        self._prefix = f"{channel_prefix}:"
        self._check = check
        self._on_published = on_published
        self._error = error
        self._lock = threading.Lock()
        self._conn: AbstractConnection | None = None
        self._pid = 0
        self._unread = 0
        self._last_write = 0.0

    def publish_many(self, events: Sequence[Event]) -> None:
        """Write PUBLISH commands for ``events`` (in order) without waiting for Redis to answer."""
        if not events:
            return
        check, prefix = self._check, self._prefix
        parts = []
        for event in events:
            check(event.topic, event)
            parts.append(_publish_command((prefix + event.topic).encode(), dumps_event(event).encode()))
        data = b"".join(parts)
        with self._lock:
            try:
                conn = self._ready()
                conn.send_packed_command((data,), check_health=False)  # type: ignore[no-untyped-call]
                self._unread += len(parts)
                self._last_write = time.monotonic()
            except (redis.exceptions.RedisError, OSError) as exc:
                self._drop()
                raise self._error(f"blocking publish failed: {exc!r}") from exc
            self._on_published(len(parts))

    def _ready(self) -> AbstractConnection:
        conn = self._conn
        if conn is not None and self._pid != os.getpid():
            # A forked child (gunicorn --preload) must not write into its parent's socket.
            self._conn, conn, self._unread = None, None, 0
        if conn is not None and (
            self._unread >= _READ_UNREAD or time.monotonic() - self._last_write > _IDLE_CHECK
        ):
            try:
                self._read_replies(conn, block=self._unread > _MAX_UNREAD)
                if self._unread == 0 and conn.can_read(timeout=0):
                    conn.read_response()  # nothing is owed: EOF (ConnectionError) or a stray reply
            except (redis.exceptions.ConnectionError, OSError):
                # Closed by the server while idle: nothing of ours was lost, connect again.
                self._drop()
                conn = None
        if conn is None:
            conn = self._connect()
            conn.connect()  # type: ignore[no-untyped-call]
            self._conn, self._pid, self._last_write = conn, os.getpid(), time.monotonic()
        return conn

    def _read_replies(self, conn: AbstractConnection, block: bool) -> None:
        # can_read() is also true at EOF: read_response() then raises ConnectionError,
        # which replaces a connection the server closed before we write to it.
        while self._unread and (block or conn.can_read(timeout=0)):
            try:
                conn.read_response()
            except redis.exceptions.ResponseError as exc:
                logger.error("redis event bus: Redis refused a PUBLISH: %s", exc)
            self._unread -= 1

    def _drop(self) -> None:
        conn, self._conn, self._unread = self._conn, None, 0
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken; nothing more to do with it
                conn.disconnect()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        with self._lock:
            self._drop()
