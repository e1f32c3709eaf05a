"""``EventsConsumer``: events to browsers over a websocket, with a small JSON protocol.

Add it to your ASGI routing (``django_eventbus.channels.routing.websocket_urlpatterns``
serves it at ``ws/events/``), behind ``AuthMiddlewareStack`` (the user decides
what may be seen) and ``AllowedHostsOriginValidator``.

Client -> server (one JSON object per text frame)::

    {"type": "subscribe", "topic": "inventory:product"}
    {"type": "subscribe", "topic": "inventory:*", "since": "<event_id>"}
    {"type": "unsubscribe", "topic": "inventory:*"}

Server -> client::

    {"type": "event", "event": {...}}          # Event.to_dict()
    {"type": "subscribed", "topic": "inventory:*", "replayed": 3, "last_event_id": "..."}
    {"type": "unsubscribed", "topic": "inventory:*"}
    {"type": "error", "code": "forbidden", "message": "...", "topic": "..."}

A ``topic`` with ``*``, ``?`` or ``[`` is an fnmatch pattern. ``since`` replays the
logged events after that event id (``""``: from the start of the log) that the
subscription matches and the user may see, *before* the ``subscribed`` frame;
live events follow it, each event once (deduplicated by id). ``last_event_id``
is the subscription's position: the last replayed event, or the newest logged
event when the subscription started (``""``: the log was empty; ``null``: there
is no event log). Every later event the subscription matches follows the
``subscribed`` frame, so a client that keeps, per subscription, this id and then
the id of each event it receives, and resubscribes with it as ``since`` after a
lost connection, misses nothing. Error codes: ``invalid_json``, ``invalid_message``,
``unknown_type``, ``missing_topic``, ``invalid_topic``, ``topic_too_long``,
``invalid_since``, ``frame_too_large``, ``binary_frame``,
``too_many_subscriptions``, ``forbidden``, ``not_subscribed``, ``since_unknown``
(the subscription is live, but the events before it cannot be replayed),
``replay_limit`` (more missed events than ``WEBSOCKET_REPLAY_LIMIT``, or more log
rows to read than ``WEBSOCKET_REPLAY_SCAN_LIMIT``: the first ones were sent; reload
the page's data), ``rate_limited`` (more subscribe frames than
``WEBSOCKET_SUBSCRIBE_RATE`` per second) and ``unavailable`` (no channel layer).
The socket stays open after every error.

Access is checked again while the socket is open: every
``WEBSOCKET_REAUTHORIZE_SECONDS`` each subscription is re-authorized with the user
as the database has it now, and one no longer allowed ends with a ``forbidden``
error frame (the socket stays open). Logging out or deactivating the user closes
the user's sockets at once, in every server process (see
:mod:`~django_eventbus.channels.revocation`): a ``revoked`` error frame, then close
code :data:`CLOSE_REVOKED`. A connection over ``WEBSOCKET_MAX_CONNECTIONS_PER_USER``
or ``WEBSOCKET_MAX_CONNECTIONS_PER_ADDRESS`` (counted per server process) gets a
``too_many_connections`` error frame and close code :data:`CLOSE_TOO_MANY_CONNECTIONS`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from django_eventbus.conf import conf
from django_eventbus.events import Event
from django_eventbus.events.codec import dumps, loads
from django_eventbus.events.topics import is_pattern, literal_head, pattern_error, topic_matches
from django_eventbus.models import StoredEvent

from . import MESSAGE_TYPE
from .auth import may_see, may_subscribe
from .forwarding import note_server_loop
from .groups import subscription_group, user_group

__all__ = ["CLOSE_REVOKED", "CLOSE_TOO_MANY_CONNECTIONS", "EventsConsumer"]

#: Close code after the user logged out or was deactivated (4000-4999: for applications).
CLOSE_REVOKED = 4401
#: Close code of a connection over the per-user or per-address limit.
CLOSE_TOO_MANY_CONNECTIONS = 4429
#: Deepest nesting accepted in a client frame: the protocol's frames are flat objects.
MAX_FRAME_DEPTH = 8
#: The message a socket sends itself to re-authorize between client frames, never during one.
REAUTHORIZE_MESSAGE_TYPE = "eventbus.reauthorize"

# Open sockets of this process per user pk and per client address.
_open_by_user: collections.Counter[Any] = collections.Counter()
_open_by_address: collections.Counter[str] = collections.Counter()

#: Event ids remembered per connection to send each event once (replay vs live,
#: and an event reaching two of the connection's groups).
RECENT_IDS = 2048
#: Authorization decisions cached per connection (per topic).
ALLOWED_CACHE = 1024
#: Log rows read per query while replaying.
REPLAY_BATCH = 500
#: Longest accepted ``since`` (``StoredEvent.event_id`` is 64 characters).
MAX_SINCE_LENGTH = 64

# Encoded event frames, shared by the connections of this process: a fan-out to
# 1,000 sockets encodes the event once. Keyed by event id (ids are unique).
_frames: dict[str, str] = {}
_FRAMES_KEPT = 256


def _event_frame(event: dict[str, Any]) -> str:
    event_id = event.get("event_id")
    frame = _frames.get(event_id) if isinstance(event_id, str) else None
    if frame is None:
        frame = dumps({"type": "event", "event": event})
        if isinstance(event_id, str):
            if len(_frames) >= _FRAMES_KEPT:
                _frames.clear()
            _frames[event_id] = frame
    return frame


class ProtocolError(Exception):
    """Bad input from the client: answered with an ``error`` frame, the socket stays open."""

    def __init__(self, code: str, message: str, topic: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.topic = topic


class _Subscription:
    __slots__ = ("group", "pattern", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.pattern = is_pattern(topic)
        self.group = subscription_group(topic)

    def matches(self, topic: str) -> bool:
        return topic_matches(self.topic, topic) if self.pattern else topic == self.topic


def validate_topic(value: Any) -> str:
    """The subscription string of a frame, or :class:`ProtocolError`."""
    if value is None or value == "":
        raise ProtocolError("missing_topic", "the frame needs a non-empty 'topic'")
    if not isinstance(value, str):
        raise ProtocolError("invalid_topic", f"'topic' must be a string, not {type(value).__name__}")
    limit = int(conf.get("WEBSOCKET_MAX_TOPIC_LENGTH"))
    if len(value) > limit:
        raise ProtocolError("topic_too_long", f"a topic or pattern has at most {limit} characters")
    if not value.isprintable() or value != value.strip():
        raise ProtocolError(
            "invalid_topic", "a topic has no control characters and no leading or trailing spaces", value
        )
    if is_pattern(value):
        problem = pattern_error(value)
        if problem is not None:
            raise ProtocolError("invalid_topic", problem, value)
    return value


class EventsConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]  # channels has no type hints
    """Websocket consumer of the event protocol (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subscriptions: dict[str, _Subscription] = {}
        self._group_refs: collections.Counter[str] = collections.Counter()
        self._allowed: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._user: Any = None
        self._counted: tuple[Any, str | None] | None = None
        self._reauthorizer: asyncio.Task[None] | None = None
        self._tokens = 0.0
        self._tokens_at = 0.0

    @property
    def user(self) -> Any:
        """The user as last authorized (refreshed from the database at each re-authorization)."""
        return self._user if self._user is not None else self.scope.get("user")

    # -- connection ------------------------------------------------------------------

    async def connect(self) -> None:
        # The forwarder needs this loop to reach an InMemoryChannelLayer (see forwarding).
        note_server_loop(asyncio.get_running_loop())
        await self.accept()
        user = self.scope.get("user")
        pk = user.pk if getattr(user, "is_authenticated", False) else None
        client = self.scope.get("client")
        address = str(client[0]) if client else None
        per_user = int(conf.get("WEBSOCKET_MAX_CONNECTIONS_PER_USER"))
        per_address = int(conf.get("WEBSOCKET_MAX_CONNECTIONS_PER_ADDRESS"))
        if (pk is not None and _open_by_user[pk] >= per_user) or (
            address is not None and _open_by_address[address] >= per_address
        ):
            # Accepted first so the client sees why (a refused handshake is a bare HTTP 403).
            await self.send_error(
                "too_many_connections",
                f"at most {per_user} sockets per user and {per_address} per address; close another one",
            )
            await self.close(code=CLOSE_TOO_MANY_CONNECTIONS)
            return
        self._counted = (pk, address)
        if pk is not None:
            _open_by_user[pk] += 1
        if address is not None:
            _open_by_address[address] += 1
        self._tokens = max(
            float(conf.get("WEBSOCKET_SUBSCRIBE_RATE")), float(conf.get("WEBSOCKET_MAX_SUBSCRIPTIONS"))
        )
        self._tokens_at = time.monotonic()
        if self.channel_layer is not None and pk is not None:
            await self.channel_layer.group_add(user_group(pk), self.channel_name)
            self._reauthorizer = asyncio.create_task(self._reauthorize_periodically())

    async def disconnect(self, code: int) -> None:
        if self._reauthorizer is not None:
            self._reauthorizer.cancel()
            self._reauthorizer = None
        if self._counted is not None:
            pk, address = self._counted
            self._counted = None
            for counter, key in ((_open_by_user, pk), (_open_by_address, address)):
                if key is not None:
                    counter[key] -= 1
                    if counter[key] <= 0:
                        del counter[key]
            if self.channel_layer is not None and pk is not None:
                await self.channel_layer.group_discard(user_group(pk), self.channel_name)
        if self.channel_layer is not None:
            for group in list(self._group_refs):
                await self.channel_layer.group_discard(group, self.channel_name)
        self._group_refs.clear()
        self.subscriptions.clear()

    async def dispatch(self, message: dict[str, Any]) -> None:
        # The one bypass of Channels' dispatch(), for live events only. Channels (>= 4.2)
        # hops to the one sync thread to close stale database connections before every
        # handler; a fan-out is one message per socket, so each event would queue one hop
        # per socket of the process on that thread. eventbus_event reaches the database
        # only through database_sync_to_async, which closes them itself. Every other
        # message (client frames, connect, reauthorize) keeps Channels' path. Figures:
        # bench/README.md, Websocket.
        if message.get("type") == MESSAGE_TYPE:
            await self.eventbus_event(message)
        else:
            await super().dispatch(message)

    # -- client frames -----------------------------------------------------------------

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        try:
            if text_data is None:
                raise ProtocolError("binary_frame", "send JSON in text frames")
            limit = int(conf.get("WEBSOCKET_MAX_FRAME_BYTES"))
            # A str has at most as many characters as UTF-8 bytes: encode only when close.
            if len(text_data) > limit or (len(text_data) * 4 > limit and len(text_data.encode()) > limit):
                raise ProtocolError("frame_too_large", f"a frame has at most {limit} bytes")
            try:
                content = loads(text_data, max_depth=MAX_FRAME_DEPTH)
            except ValueError as exc:
                raise ProtocolError("invalid_json", f"the frame is not a flat JSON object: {exc}") from None
            await self.receive_json(content)
        except ProtocolError as exc:
            await self.send_error(exc.code, exc.message, exc.topic)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            raise ProtocolError("invalid_message", "a frame is a JSON object with a 'type'")
        kind = content.get("type")
        if kind == "subscribe":
            await self.subscribe(content)
        elif kind == "unsubscribe":
            await self.unsubscribe(content)
        else:
            raise ProtocolError("unknown_type", f"unknown frame type {kind!r}; use subscribe or unsubscribe")

    async def send_error(self, code: str, message: str, topic: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if topic is not None:
            frame["topic"] = topic
        await self.send(text_data=dumps(frame))

    # -- subscribe / unsubscribe ---------------------------------------------------------

    def _take_token(self) -> bool:
        """Token bucket of subscribe frames: refilled at ``WEBSOCKET_SUBSCRIBE_RATE`` per second, with
        a burst of a second's worth or ``WEBSOCKET_MAX_SUBSCRIPTIONS`` (a page opening all its
        subscriptions at once), whichever is more."""
        now = time.monotonic()
        rate = float(conf.get("WEBSOCKET_SUBSCRIBE_RATE"))
        burst = max(rate, float(conf.get("WEBSOCKET_MAX_SUBSCRIPTIONS")))
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    async def subscribe(self, content: dict[str, Any]) -> None:
        if not self._take_token():
            rate = conf.get("WEBSOCKET_SUBSCRIBE_RATE")
            raise ProtocolError("rate_limited", f"at most {rate} subscribe frames per second; slow down")
        topic = validate_topic(content.get("topic"))
        since = content.get("since")
        if since is not None and (not isinstance(since, str) or len(since) > MAX_SINCE_LENGTH):
            raise ProtocolError("invalid_since", "'since' is an event id (a string)", topic)
        if self.channel_layer is None:
            raise ProtocolError("unavailable", "no channel layer is configured (CHANNEL_LAYERS)", topic)
        is_new = topic not in self.subscriptions
        limit = int(conf.get("WEBSOCKET_MAX_SUBSCRIPTIONS"))
        if is_new and len(self.subscriptions) >= limit:
            raise ProtocolError("too_many_subscriptions", f"at most {limit} subscriptions per socket", topic)
        subscription = _Subscription(topic)
        # One trip to the database thread: authorization, and where the replay starts --
        # after ``since``, or after the newest logged event *before* joining the group.
        # Then every event after that position reaches the socket (replayed, or live once
        # joined; both copies are sent once), and ``last_event_id`` is a position the
        # client can resume from without a gap.
        allowed, start, since_known = await database_sync_to_async(_prepare)(
            self.user, topic, subscription.pattern, since
        )
        if not allowed:
            authenticated = getattr(self.user, "is_authenticated", False)
            reason = "you may not see these events" if authenticated else "log in to see these events"
            raise ProtocolError("forbidden", f"{reason} ({topic})", topic)
        if not subscription.pattern:
            self._remember_allowed(topic, True)
        if not since_known:
            await self.send_error(
                "since_unknown",
                f"event {since!r} is not in the event log (pruned, or the log is off): missed events "
                "cannot be replayed; reload the data. Live events follow.",
                topic,
            )
        if is_new:
            self.subscriptions[topic] = subscription
            if self._group_refs[subscription.group] == 0:
                await self.channel_layer.group_add(subscription.group, self.channel_name)
            self._group_refs[subscription.group] += 1
        replayed = 0
        last_event_id = None
        if start is not None:
            replayed, last_event_id = await self._replay(subscription, *start)
        await self.send(
            text_data=dumps(
                {"type": "subscribed", "topic": topic, "replayed": replayed, "last_event_id": last_event_id}
            )
        )

    async def unsubscribe(self, content: dict[str, Any]) -> None:
        topic = validate_topic(content.get("topic"))
        if topic not in self.subscriptions:
            raise ProtocolError("not_subscribed", f"not subscribed to {topic!r}", topic)
        await self._drop(topic)
        await self.send(text_data=dumps({"type": "unsubscribed", "topic": topic}))

    # -- access revoked -------------------------------------------------------------------

    async def _reauthorize_periodically(self) -> None:
        # Only a trigger: the work happens in eventbus_reauthorize, dispatched like any
        # other message, so it never interleaves with a subscribe half done.
        while True:
            await asyncio.sleep(float(conf.get("WEBSOCKET_REAUTHORIZE_SECONDS")))
            if self.subscriptions and self.channel_layer is not None:
                await self.channel_layer.send(self.channel_name, {"type": REAUTHORIZE_MESSAGE_TYPE})

    async def eventbus_reauthorize(self, message: dict[str, Any]) -> None:
        """Check every subscription again with the user as the database has it now."""
        subscriptions = [(s.topic, s.pattern) for s in self.subscriptions.values()]
        user, allowed = await database_sync_to_async(_reauthorize)(self.user, subscriptions)
        self._user = user
        self._allowed.clear()  # topic decisions of pattern subscriptions are taken again
        for topic, ok in zip(subscriptions, allowed, strict=True):
            if not ok and topic[0] in self.subscriptions:
                await self._drop(topic[0])
                await self.send_error(
                    "forbidden", f"you may no longer see these events ({topic[0]})", topic[0]
                )

    async def eventbus_revoke(self, message: dict[str, Any]) -> None:
        """The user logged out or was deactivated (message type ``eventbus.revoke``)."""
        reason = message.get("reason") if isinstance(message.get("reason"), str) else "access revoked"
        await self.send_error("revoked", f"{reason}: this socket is closed; log in again")
        await self.close(code=CLOSE_REVOKED)

    async def _drop(self, topic: str) -> None:
        subscription = self.subscriptions.pop(topic)
        self._group_refs[subscription.group] -= 1
        if self._group_refs[subscription.group] <= 0:
            del self._group_refs[subscription.group]
            if self.channel_layer is not None:
                await self.channel_layer.group_discard(subscription.group, self.channel_name)

    # -- events ---------------------------------------------------------------------------

    async def eventbus_event(self, message: dict[str, Any]) -> None:
        """A live event from a group (message type ``eventbus.event``)."""
        event = message.get("event")
        if not isinstance(event, dict):
            return
        topic, event_id = event.get("topic"), event.get("event_id")
        if not isinstance(topic, str) or not isinstance(event_id, str) or event_id in self._recent:
            return
        if not any(s.matches(topic) for s in self.subscriptions.values()):
            return  # a broader group than this socket wants, or an unsubscribe in flight
        if not await self._may_see([topic]):
            return
        self._remember_sent(event_id)
        await self.send(text_data=_event_frame(event))

    async def _replay(self, subscription: _Subscription, position: int, position_id: str) -> tuple[int, str]:
        """Send the logged events after ``position`` that the subscription wants and the user may see.

        Returns how many were sent and the id to resume from (the last one read).
        """
        limit = int(conf.get("WEBSOCKET_REPLAY_LIMIT"))
        scan_limit = int(conf.get("WEBSOCKET_REPLAY_SCAN_LIMIT"))
        events, truncated, scanned_to = await database_sync_to_async(_read_after)(
            subscription.topic, subscription.pattern, position, limit, scan_limit
        )
        allowed = await self._may_see({e.topic for e in events})
        sent = 0
        for event in events:
            if event.event_id in self._recent or event.topic not in allowed:
                continue
            self._remember_sent(event.event_id)
            await self.send(text_data=_event_frame(event.to_dict()))
            sent += 1
        if scanned_to is not None:
            # Resuming from the last row read (not the last event sent) lets a client page on.
            await self.send_error(
                "replay_limit",
                f"more than {scan_limit} logged events to read: the matching ones among the first "
                f"{scan_limit} were sent; reload the data",
                subscription.topic,
            )
            return sent, scanned_to
        if truncated:
            await self.send_error(
                "replay_limit",
                f"more than {limit} events were missed: the first {limit} were sent; reload the data",
                subscription.topic,
            )
        return sent, events[-1].event_id if events else position_id

    # -- bookkeeping -----------------------------------------------------------------------

    async def _may_see(self, topics: Iterable[str]) -> set[str]:
        """The subset of ``topics`` this user may receive (cached per connection)."""
        unknown = [t for t in topics if t not in self._allowed]
        if unknown:
            decisions = await database_sync_to_async(_decide)(self.user, unknown)
            for topic, allowed in decisions.items():
                self._remember_allowed(topic, allowed)
        return {t for t in topics if self._allowed.get(t, False)}

    def _remember_allowed(self, topic: str, allowed: bool) -> None:
        self._allowed[topic] = allowed
        self._allowed.move_to_end(topic)
        if len(self._allowed) > ALLOWED_CACHE:
            self._allowed.popitem(last=False)

    def _remember_sent(self, event_id: str) -> None:
        self._recent[event_id] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return dumps(content)


# -- database access (sync, through database_sync_to_async) -------------------------------------


def _reauthorize(user: Any, subscriptions: list[tuple[str, bool]]) -> tuple[Any, list[bool]]:
    """The user reloaded from the database (anonymous if deleted), and which subscriptions it may keep."""
    if getattr(user, "is_authenticated", False):
        from django.contrib.auth import get_user_model
        from django.contrib.auth.models import AnonymousUser

        # A fresh instance: no cached permissions, the current is_active.
        user = get_user_model()._default_manager.filter(pk=user.pk).first() or AnonymousUser()
    return user, [may_subscribe(user, topic, pattern) for topic, pattern in subscriptions]


def _decide(user: Any, topics: list[str]) -> dict[str, bool]:
    return {topic: may_see(user, topic) for topic in topics}


def _prepare(
    user: Any, topic: str, pattern: bool, since: str | None
) -> tuple[bool, tuple[int, str] | None, bool]:
    """Whether ``user`` may subscribe, the replay start, and whether ``since`` was found."""
    if not may_subscribe(user, topic, pattern):
        return False, None, True
    start = _start_position(since)
    if since is not None and start is None:
        return True, _start_position(None), False
    return True, start, True


def _start_position(since: str | None) -> tuple[int, str] | None:
    """(log id, event id) to replay after: ``since``'s row, or the newest row when ``since`` is None.

    ``(0, "")`` stands for "before the first event" (``since=""``, or an empty log).
    ``None`` when ``since`` is not in the log, or there is no log (``STORE_EVENTS`` off).
    """
    if not conf.STORE_EVENTS:
        return None
    if since == "":
        return 0, ""
    rows = StoredEvent.objects.values_list("id", "event_id")
    if since is None:
        return rows.order_by("-id").first() or (0, "")
    return rows.filter(event_id=since).first()


def _read_after(
    topic: str, pattern: bool, position: int, limit: int, scan_limit: int
) -> tuple[list[Event], bool, str | None]:
    """Up to ``limit`` logged events after ``position`` matching the subscription, in log order,
    whether there were more, and the event id of the last row read if reading stopped at
    ``scan_limit`` rows (a pattern like ``*z`` must not read the whole log per subscribe)."""
    rows = StoredEvent.objects.order_by("id")
    if not pattern:
        rows = rows.filter(topic=topic)
    elif literal_head(topic):
        # A superset (LIKE ignores ASCII case on SQLite): topic_matches decides below.
        rows = rows.filter(topic__startswith=literal_head(topic))
    events: list[Event] = []
    scanned = 0
    while True:
        batch = list(rows.filter(id__gt=position)[: min(REPLAY_BATCH, scan_limit - scanned)])
        for row in batch:
            if not pattern or topic_matches(topic, row.topic):
                if len(events) == limit:
                    return events, True, None
                events.append(row.to_event())
        scanned += len(batch)
        if len(batch) < REPLAY_BATCH and scanned < scan_limit:
            return events, False, None
        if scanned >= scan_limit:
            more = rows.filter(id__gt=batch[-1].id).exists() if batch else False
            return events, False, batch[-1].event_id if more else None
        position = batch[-1].id
