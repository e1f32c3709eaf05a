"""Access that ends while a socket is open, and the limits of one client, on the real Redis channel layer.

Revoked access (issue 15, finding 2): a permission taken away ends the subscription at
the next re-authorization; a logout or a deactivation closes every socket of the user
within a second, through the channel layer. Then the limits: sockets per user and per
address, subscribe frames per second, log rows read per replay.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser, Permission
from django.test import Client

from django_eventbus.channels.consumer import CLOSE_REVOKED, CLOSE_TOO_MANY_CONNECTIONS
from django_eventbus.channels.forwarding import forward
from django_eventbus.models import StoredEvent
from tests.services import require_redis
from tests.websocket_support import (
    PATH,
    event,
    expect_error,
    expect_event,
    make_user,
    store,
    subscribe,
    with_user,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]


@pytest.fixture(autouse=True)
def redis_layer(settings: Any) -> None:
    # The layer of production: revocations travel through Redis to every server process.
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [require_redis()], "prefix": f"t{uuid.uuid4().hex[:8]}"},
        }
    }


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    opened: list[WebsocketCommunicator] = []

    async def open_socket(user: Any, client: str | None = None) -> WebsocketCommunicator:
        communicator = WebsocketCommunicator(with_user(user, client), PATH)
        connected, _ = await communicator.connect()
        assert connected
        opened.append(communicator)
        return communicator

    yield open_socket
    for communicator in opened:
        await communicator.disconnect()


async def expect_closed(ws: WebsocketCommunicator, code: int, within: float) -> None:
    started = time.monotonic()
    frame = await ws.receive_json_from(timeout=within)
    assert frame["type"] == "error" and frame["code"] in {"revoked", "too_many_connections"}, frame
    closed = await ws.receive_output(timeout=max(0.01, within - (time.monotonic() - started)))
    assert closed == {"type": "websocket.close", "code": code}


async def still_answers(ws: WebsocketCommunicator) -> None:
    await ws.send_json_to({"type": "unsubscribe", "topic": "never:subscribed"})
    await expect_error(ws, "not_subscribed")


# -- revoked access ----------------------------------------------------------------------------


async def test_a_permission_taken_away_ends_the_subscription(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "WEBSOCKET_REAUTHORIZE_SECONDS": 0.2}
    viewer = await database_sync_to_async(make_user)("viewer", "inventory.view_product")
    ws = WebsocketCommunicator(with_user(viewer), PATH)
    assert (await ws.connect())[0]
    try:
        assert (await subscribe(ws, "inventory:product"))["type"] == "subscribed"
        first = event("inventory:product", n=1)
        await forward(first)
        await expect_event(ws, first)

        await database_sync_to_async(viewer.user_permissions.remove)(
            await database_sync_to_async(Permission.objects.get)(codename="view_product")
        )
        frame = await expect_error(ws, "forbidden")  # within two periods
        assert frame["topic"] == "inventory:product"
        await forward(event("inventory:product", n=2))
        assert await ws.receive_nothing(timeout=0.3)
        await still_answers(ws)
    finally:
        await ws.disconnect()


async def test_logging_out_closes_every_socket_of_the_user(connect: Any) -> None:
    user = await database_sync_to_async(make_user)("viewer", "inventory.view_product")
    other = await database_sync_to_async(make_user)("other", "inventory.view_product")
    first, second, bystander = await connect(user), await connect(user), await connect(other)
    for ws in (first, second, bystander):
        assert (await subscribe(ws, "inventory:product"))["type"] == "subscribed"

    client = Client()
    await database_sync_to_async(client.force_login)(user)
    await database_sync_to_async(client.logout)()  # sends user_logged_out, as a real logout does

    await expect_closed(first, CLOSE_REVOKED, within=1.0)
    await expect_closed(second, CLOSE_REVOKED, within=1.0)
    await still_answers(bystander)


async def test_deactivating_a_user_closes_its_sockets(connect: Any) -> None:
    user = await database_sync_to_async(make_user)("viewer", "inventory.view_product")
    anonymous = await connect(AnonymousUser())
    ws = await connect(user)
    assert (await subscribe(ws, "inventory:product"))["type"] == "subscribed"

    def deactivate() -> None:
        user.is_active = False
        user.save(update_fields=["is_active"])

    await database_sync_to_async(deactivate)()
    await expect_closed(ws, CLOSE_REVOKED, within=1.0)
    await still_answers(anonymous)


# -- limits -------------------------------------------------------------------------------------


async def test_sockets_per_user_are_limited(connect: Any, settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "WEBSOCKET_MAX_CONNECTIONS_PER_USER": 2}
    user = await database_sync_to_async(make_user)("viewer", "inventory.view_product")
    first, _second = await connect(user), await connect(user)
    third = await connect(user)
    await expect_closed(third, CLOSE_TOO_MANY_CONNECTIONS, within=3.0)
    await first.disconnect()
    fourth = await connect(user)  # a closed socket frees its place
    await still_answers(fourth)


async def test_sockets_per_address_are_limited(connect: Any, settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "WEBSOCKET_MAX_CONNECTIONS_PER_ADDRESS": 2}
    await connect(AnonymousUser(), "203.0.113.7")
    await connect(AnonymousUser(), "203.0.113.7")
    third = await connect(AnonymousUser(), "203.0.113.7")
    await expect_closed(third, CLOSE_TOO_MANY_CONNECTIONS, within=3.0)
    await still_answers(await connect(AnonymousUser(), "203.0.113.8"))


async def test_subscribe_frames_are_rate_limited(connect: Any, settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "WEBSOCKET_SUBSCRIBE_RATE": 5, "WEBSOCKET_MAX_SUBSCRIPTIONS": 2}
    ws = await connect(await database_sync_to_async(make_user)("admin", superuser=True))
    codes = []
    for n in range(8):  # a burst of 5 (a second's worth), then refused
        await ws.send_json_to({"type": "subscribe", "topic": f"a:{n % 2}"})
        frame = await ws.receive_json_from(timeout=3)
        codes.append(frame.get("code", frame["type"]))
    assert codes.count("subscribed") >= 5 and "rate_limited" in codes, codes
    deadline = time.monotonic() + 3
    while (frame := await subscribe(ws, "a:0"))["type"] != "subscribed":
        assert frame["code"] == "rate_limited" and time.monotonic() < deadline, frame


async def test_replay_reads_a_bounded_number_of_log_rows(connect: Any, settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "WEBSOCKET_REPLAY_SCAN_LIMIT": 10}
    ws = await connect(await database_sync_to_async(make_user)("admin", superuser=True))
    await database_sync_to_async(store)(*(event(f"noise:{n}") for n in range(25)), event("wanted:z"))
    ids = await database_sync_to_async(
        lambda: list(StoredEvent.objects.order_by("id").values_list("event_id", flat=True))
    )()

    async def resubscribe(since: str) -> None:
        await ws.send_json_to({"type": "unsubscribe", "topic": "*z"})
        assert (await ws.receive_json_from(timeout=3))["type"] == "unsubscribed"
        await ws.send_json_to({"type": "subscribe", "topic": "*z", "since": since})

    # A pattern with no literal head reads the log in log order: 10 rows, then it says so,
    # and its position is the last row read, so that resuming from it pages on.
    await ws.send_json_to({"type": "subscribe", "topic": "*z", "since": ""})
    assert (await expect_error(ws, "replay_limit"))["topic"] == "*z"
    assert (await ws.receive_json_from(timeout=3))["last_event_id"] == ids[9]
    await resubscribe(ids[9])
    await expect_error(ws, "replay_limit")
    assert (await ws.receive_json_from(timeout=3))["last_event_id"] == ids[19]
    await resubscribe(ids[19])
    replayed = await ws.receive_json_from(timeout=3)
    assert replayed["type"] == "event" and replayed["event"]["topic"] == "wanted:z"
    assert (await ws.receive_json_from(timeout=3)) == {
        "type": "subscribed",
        "topic": "*z",
        "replayed": 1,
        "last_event_id": ids[25],
    }


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("WEBSOCKET_REAUTHORIZE_SECONDS", 0.5, True),
        ("WEBSOCKET_REAUTHORIZE_SECONDS", 0, False),
        ("WEBSOCKET_SUBSCRIBE_RATE", "10", False),
        ("WEBSOCKET_MAX_CONNECTIONS_PER_USER", 1.5, False),
        ("WEBSOCKET_REPLAY_SCAN_LIMIT", True, False),
    ],
)
def test_the_limits_are_checked(settings: Any, key: str, value: Any, ok: bool) -> None:
    from django_eventbus.channels.checks import check_channels

    settings.EVENTBUS = {**settings.EVENTBUS, key: value}
    errors = [m for m in check_channels() if m.id == "django_eventbus.E102"]
    assert (errors == []) is ok, errors
    assert ok or key in errors[0].msg
