"""The websocket consumer's protocol, authorization and bad input, through ``WebsocketCommunicator``.

Events reach the consumer the way they do in production: ``forward()`` sends them to
the channel layer's groups (here a fresh ``InMemoryChannelLayer`` per test).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from django_eventbus.channels.forwarding import forward
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

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fresh_layer(settings: Any) -> Iterator[None]:
    # A new layer per test (channels drops its cached layers when the setting changes).
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    yield


@pytest.fixture
def users(db: Any) -> dict[str, Any]:
    return {
        "admin": make_user("admin", superuser=True),
        "viewer": make_user("viewer", "inventory.view_product"),
        "staff": make_user("staff", staff=True),
        "log_reader": make_user("log_reader", "django_eventbus.view_storedevent", staff=True),
        "plain": make_user("plain"),
        "anonymous": AnonymousUser(),
    }


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    opened: list[WebsocketCommunicator] = []

    async def open_socket(user: Any) -> WebsocketCommunicator:
        communicator = WebsocketCommunicator(with_user(user), PATH)
        connected, _ = await communicator.connect()
        assert connected
        opened.append(communicator)
        return communicator

    yield open_socket
    for communicator in opened:
        await communicator.disconnect()


async def receive_events_until_subscribed(ws: WebsocketCommunicator) -> tuple[list[dict[str, Any]], Any]:
    """Frames of a subscribe with ``since``: the replayed events, then ``subscribed``."""
    frames: list[dict[str, Any]] = []
    while True:
        frame = await ws.receive_json_from(timeout=3)
        if frame["type"] == "subscribed":
            return frames, frame
        frames.append(frame)


# -- protocol --------------------------------------------------------------------------------


async def test_subscribe_then_receive_events(users: dict[str, Any], connect: Any) -> None:
    ws = await connect(users["admin"])
    frame = await subscribe(ws, "inventory:product")
    assert frame == {"type": "subscribed", "topic": "inventory:product", "replayed": 0, "last_event_id": ""}
    sent = event("inventory:product", name="Lamp")
    await forward(sent)
    await expect_event(ws, sent)
    await forward(event("inventory:order"))  # another topic: not for this socket
    assert await ws.receive_nothing(timeout=0.2)


async def test_only_live_events_skip_channels_dispatch(
    users: dict[str, Any], connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Channels >= 4.2 closes stale database connections before every handler; the
    # consumer keeps that for client frames and skips it for the fan-out of live events
    # (EventsConsumer.dispatch, bench/README.md).
    import channels.consumer

    if not hasattr(channels.consumer, "aclose_old_connections"):
        pytest.skip("Channels < 4.2 does not close old connections in dispatch()")
    calls: list[None] = []

    async def counted() -> None:
        calls.append(None)

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counted)
    ws = await connect(users["admin"])
    after_connect = len(calls)
    await subscribe(ws, "inventory:product")
    assert len(calls) == after_connect + 1
    sent = event("inventory:product", name="Lamp")
    await forward(sent)
    await expect_event(ws, sent)
    assert len(calls) == after_connect + 1
    await ws.send_json_to({"type": "unsubscribe", "topic": "inventory:product"})
    assert (await ws.receive_json_from(timeout=3))["type"] == "unsubscribed"
    assert len(calls) == after_connect + 2


async def test_pattern_receives_every_topic_under_the_prefix(users: dict[str, Any], connect: Any) -> None:
    ws = await connect(users["admin"])
    assert (await subscribe(ws, "inventory:*"))["type"] == "subscribed"
    product, order, other = event("inventory:product"), event("inventory:order"), event("billing:invoice")
    for sent in (product, other, order):
        await forward(sent)
    await expect_event(ws, product)
    await expect_event(ws, order)
    assert await ws.receive_nothing(timeout=0.2)


async def test_other_patterns_are_filtered(users: dict[str, Any], connect: Any) -> None:
    ws = await connect(users["admin"])
    await subscribe(ws, "inventory:prod*")  # joins the inventory: group, filters
    await subscribe(ws, "*:invoice")  # joins eventbus.all, filters
    product, order, invoice = event("inventory:product"), event("inventory:order"), event("billing:invoice")
    for sent in (product, order, invoice):
        await forward(sent)
    await expect_event(ws, product)
    await expect_event(ws, invoice)
    assert await ws.receive_nothing(timeout=0.2)


async def test_overlapping_subscriptions_deliver_each_event_once(users: dict[str, Any], connect: Any) -> None:
    ws = await connect(users["admin"])
    for topic in ("inventory:product", "inventory:*", "*", "inventory:prod*"):
        assert (await subscribe(ws, topic))["type"] == "subscribed"
    sent = event("inventory:product")
    await forward(sent)
    await expect_event(ws, sent)
    assert await ws.receive_nothing(timeout=0.2)


async def test_an_event_forwarded_again_is_sent_once(users: dict[str, Any], connect: Any) -> None:
    """A restarted forwarder re-sends the event that was in flight: the socket drops the copy."""
    ws = await connect(users["admin"])
    await subscribe(ws, "inventory:product")
    first, second = event("inventory:product"), event("inventory:product")
    await forward(first)
    await forward(second)
    await forward(first)  # the resumed forwarder's copy
    await expect_event(ws, first)
    await expect_event(ws, second)
    assert await ws.receive_nothing(timeout=0.2)


async def test_unsubscribe(users: dict[str, Any], connect: Any) -> None:
    ws = await connect(users["admin"])
    await subscribe(ws, "inventory:product")
    await subscribe(ws, "inventory:*")
    await ws.send_json_to({"type": "unsubscribe", "topic": "inventory:*"})
    assert await ws.receive_json_from() == {"type": "unsubscribed", "topic": "inventory:*"}
    await forward(event("inventory:order"))
    assert await ws.receive_nothing(timeout=0.2)
    sent = event("inventory:product")
    await forward(sent)
    await expect_event(ws, sent)  # the exact subscription is still there
    await ws.send_json_to({"type": "unsubscribe", "topic": "inventory:product"})
    assert (await ws.receive_json_from())["type"] == "unsubscribed"
    await forward(event("inventory:product"))
    assert await ws.receive_nothing(timeout=0.2)
    await ws.send_json_to({"type": "unsubscribe", "topic": "inventory:product"})
    await expect_error(ws, "not_subscribed")


async def test_two_sockets_each_get_the_event(users: dict[str, Any], connect: Any) -> None:
    first, second = await connect(users["admin"]), await connect(users["admin"])
    await subscribe(first, "inventory:product")
    await subscribe(second, "inventory:*")
    sent = event("inventory:product")
    await forward(sent)
    await expect_event(first, sent)
    await expect_event(second, sent)


# -- authorization ----------------------------------------------------------------------------


async def test_anonymous_users_get_nothing(users: dict[str, Any], connect: Any) -> None:
    ws = await connect(users["anonymous"])
    for topic in ("inventory:product", "inventory:*", "*", "reports:daily"):
        await ws.send_json_to({"type": "subscribe", "topic": topic})
        frame = await expect_error(ws, "forbidden")
        assert "log in" in frame["message"]
        assert frame["topic"] == topic
    await forward(event("inventory:product"))
    assert await ws.receive_nothing(timeout=0.2)


async def test_model_topics_need_the_view_permission(users: dict[str, Any], connect: Any) -> None:
    ws = await connect(users["viewer"])  # view_product only, not staff
    assert (await subscribe(ws, "inventory:product"))["type"] == "subscribed"
    for topic in ("inventory:order", "reports:daily", "reports:*", "inventory:ord*"):
        await ws.send_json_to({"type": "subscribe", "topic": topic})
        await expect_error(ws, "forbidden")
    # "*" can match inventory:product: accepted (and filtered per event, see below).
    assert (await subscribe(ws, "*"))["type"] == "subscribed"
    plain = await connect(users["plain"])
    await plain.send_json_to({"type": "subscribe", "topic": "inventory:product"})
    await expect_error(plain, "forbidden")


async def test_patterns_deliver_only_the_topics_the_user_may_see(users: dict[str, Any], connect: Any) -> None:
    viewer = await connect(users["viewer"])
    # Accepted: it can match inventory:product, which the viewer may see...
    assert (await subscribe(viewer, "inventory:*"))["type"] == "subscribed"
    staff = await connect(users["staff"])  # staff without model permissions
    assert (await subscribe(staff, "*"))["type"] == "subscribed"
    product, order, report = event("inventory:product"), event("inventory:order"), event("reports:daily")
    for sent in (order, product, report):
        await forward(sent)
    # ...but each event is checked by its own topic.
    await expect_event(viewer, product)
    assert await viewer.receive_nothing(timeout=0.2)
    await expect_event(staff, report)
    assert await staff.receive_nothing(timeout=0.2)


async def test_readers_of_the_event_log_may_follow_every_topic(users: dict[str, Any], connect: Any) -> None:
    # The admin's list shows them every event: its live mode must not show fewer.
    reader = await connect(users["log_reader"])  # no model permission
    assert (await subscribe(reader, "*"))["type"] == "subscribed"
    product, order, report = event("inventory:product"), event("inventory:order"), event("reports:daily")
    for sent in (order, product, report):
        await forward(sent)
    for sent in (order, product, report):
        await expect_event(reader, sent)


async def test_authorization_is_pluggable(users: dict[str, Any], connect: Any, settings: Any) -> None:
    settings.EVENTBUS = {
        **settings.EVENTBUS,
        "WEBSOCKET_AUTHORIZE": "tests.test_websocket_consumer.public_only",
    }
    anonymous = await connect(users["anonymous"])
    assert (await subscribe(anonymous, "public:news"))["type"] == "subscribed"
    assert (await subscribe(anonymous, "public:*"))["type"] == "subscribed"
    await anonymous.send_json_to({"type": "subscribe", "topic": "*"})
    await expect_error(anonymous, "forbidden")
    admin = await connect(users["admin"])  # the callable decides, even for a superuser
    await admin.send_json_to({"type": "subscribe", "topic": "inventory:product"})
    await expect_error(admin, "forbidden")
    sent = event("public:news")
    await forward(sent)
    await expect_event(anonymous, sent)


def public_only(user: Any, topic: str) -> bool:
    """A custom policy: everyone sees public:…, nobody sees anything else."""
    return topic.startswith("public:")


# -- bad input: an error frame, and the socket stays usable --------------------------------------


BAD_FRAMES = [
    ("not json", "invalid_json"),
    ("{'type': 'subscribe'}", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('"subscribe"', "invalid_message"),
    ("null", "invalid_message"),
    ('{"topic": "inventory:product"}', "unknown_type"),
    ('{"type": "publish", "topic": "inventory:product"}', "unknown_type"),
    ('{"type": "subscribe"}', "missing_topic"),
    ('{"type": "subscribe", "topic": ""}', "missing_topic"),
    ('{"type": "subscribe", "topic": null}', "missing_topic"),
    ('{"type": "subscribe", "topic": 42}', "invalid_topic"),
    ('{"type": "subscribe", "topic": ["a"]}', "invalid_topic"),
    ('{"type": "subscribe", "topic": "a\\nb"}', "invalid_topic"),
    ('{"type": "subscribe", "topic": " inventory:product"}', "invalid_topic"),
    ('{"type": "subscribe", "topic": "inventory:[abc"}', "invalid_topic"),
    ('{"type": "subscribe", "topic": "' + "x" * 201 + '"}', "topic_too_long"),
    ('{"type": "subscribe", "topic": "' + "x" * 199 + ':*"}', "topic_too_long"),
    ('{"type": "subscribe", "topic": "inventory:product", "since": 5}', "invalid_since"),
    ('{"type": "subscribe", "topic": "inventory:product", "since": "' + "x" * 65 + '"}', "invalid_since"),
    ('{"type": "unsubscribe"}', "missing_topic"),
    ('{"type": "unsubscribe", "topic": "never:subscribed"}', "not_subscribed"),
    # json.loads raises RecursionError, not ValueError, past ~1,000 levels; and a frame that
    # parses just under that is no protocol frame either.
    ("[" * 4000, "invalid_json"),
    ('{"type": "subscribe", "topic": "a", "x": ' + "[" * 900 + "]" * 900 + "}", "invalid_json"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_input_answers_an_error_and_keeps_the_socket(
    users: dict[str, Any], connect: Any, frame: str, code: str
) -> None:
    ws = await connect(users["admin"])
    await ws.send_to(text_data=frame)
    await expect_error(ws, code)
    # Still open and working.
    assert (await subscribe(ws, "inventory:product"))["type"] == "subscribed"


async def test_binary_frames_are_refused(users: dict[str, Any], connect: Any) -> None:
    ws = await connect(users["admin"])
    await ws.send_to(bytes_data=b'{"type": "subscribe", "topic": "inventory:product"}')
    await expect_error(ws, "binary_frame")
    assert (await subscribe(ws, "inventory:product"))["type"] == "subscribed"


async def test_frames_over_the_size_limit_are_refused(
    users: dict[str, Any], connect: Any, settings: Any
) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "WEBSOCKET_MAX_FRAME_BYTES": 100}
    ws = await connect(users["admin"])
    padding = "p" * 60
    await ws.send_to(text_data=json.dumps({"type": "subscribe", "topic": "inventory:product", "x": padding}))
    await expect_error(ws, "frame_too_large")
    # Counted in bytes, not characters: 30 "€" are 90 bytes.
    await ws.send_to(text_data=json.dumps({"type": "subscribe", "topic": "€" * 30}, ensure_ascii=False))
    await expect_error(ws, "frame_too_large")
    assert (await subscribe(ws, "inventory:product"))["type"] == "subscribed"
    # A huge frame too (the limit is checked before parsing).
    await ws.send_to(text_data="[" * 1_000_000)
    await expect_error(ws, "frame_too_large")


async def test_subscription_limit(users: dict[str, Any], connect: Any, settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "WEBSOCKET_MAX_SUBSCRIPTIONS": 2}
    ws = await connect(users["admin"])
    await subscribe(ws, "a:1")
    await subscribe(ws, "a:2")
    await ws.send_json_to({"type": "subscribe", "topic": "a:3"})
    frame = await expect_error(ws, "too_many_subscriptions")
    assert frame["topic"] == "a:3"
    # Subscribing again to a topic it has is not a new subscription.
    assert (await subscribe(ws, "a:2"))["type"] == "subscribed"
    await ws.send_json_to({"type": "unsubscribe", "topic": "a:1"})
    await ws.receive_json_from()
    assert (await subscribe(ws, "a:3"))["type"] == "subscribed"


async def test_no_channel_layer(users: dict[str, Any], connect: Any, settings: Any) -> None:
    settings.CHANNEL_LAYERS = {}
    ws = await connect(users["admin"])
    await ws.send_json_to({"type": "subscribe", "topic": "inventory:product"})
    await expect_error(ws, "unavailable")


async def test_origin_is_checked(settings: Any) -> None:
    from testproject.asgi import application

    evil = WebsocketCommunicator(application, PATH, headers=[(b"origin", b"http://evil.example")])
    connected, _ = await evil.connect()
    assert not connected
    await evil.disconnect()
    good = WebsocketCommunicator(
        application, PATH, headers=[(b"origin", b"http://127.0.0.1:8000"), (b"host", b"127.0.0.1:8000")]
    )
    connected, _ = await good.connect()
    assert connected
    await good.send_json_to({"type": "subscribe", "topic": "inventory:product"})
    assert (await good.receive_json_from())["code"] == "forbidden"  # anonymous through AuthMiddleware
    await good.disconnect()


# -- replay with since ------------------------------------------------------------------------------


async def test_since_replays_what_was_missed_then_goes_live(users: dict[str, Any], connect: Any) -> None:
    history = await database_sync_to_async(store)(
        event("inventory:product", n=1),
        event("inventory:order", n=2),
        event("inventory:product", n=3),
        event("billing:invoice", n=4),
        event("inventory:product", n=5),
    )
    ws = await connect(users["admin"])
    await ws.send_json_to({"type": "subscribe", "topic": "inventory:product", "since": history[0].event_id})
    replayed, subscribed = await receive_events_until_subscribed(ws)
    assert [f["event"]["event_id"] for f in replayed] == [history[2].event_id, history[4].event_id]
    assert subscribed["replayed"] == 2
    assert subscribed["last_event_id"] == history[4].event_id
    # A live copy of a replayed event is not sent again; a new one is.
    await forward(history[4])
    new = event("inventory:product", n=6)
    await forward(new)
    await expect_event(ws, new)
    assert await ws.receive_nothing(timeout=0.2)


async def test_since_with_a_pattern(users: dict[str, Any], connect: Any) -> None:
    history = await database_sync_to_async(store)(
        event("inventory:product"), event("inventory:order"), event("billing:invoice"), event("inventory:x:y")
    )
    ws = await connect(users["admin"])
    await ws.send_json_to({"type": "subscribe", "topic": "inventory:*", "since": history[0].event_id})
    replayed, subscribed = await receive_events_until_subscribed(ws)
    assert [f["event"]["topic"] for f in replayed] == ["inventory:order", "inventory:x:y"]
    assert subscribed["last_event_id"] == history[3].event_id


async def test_since_empty_replays_from_the_start(users: dict[str, Any], connect: Any) -> None:
    history = await database_sync_to_async(store)(event("inventory:product"), event("inventory:product"))
    ws = await connect(users["admin"])
    await ws.send_json_to({"type": "subscribe", "topic": "inventory:product", "since": ""})
    replayed, _ = await receive_events_until_subscribed(ws)
    assert [f["event"]["event_id"] for f in replayed] == [e.event_id for e in history]


async def test_replay_respects_authorization(users: dict[str, Any], connect: Any) -> None:
    history = await database_sync_to_async(store)(
        event("inventory:product"), event("inventory:order"), event("inventory:product")
    )
    ws = await connect(users["viewer"])
    await ws.send_json_to({"type": "subscribe", "topic": "inventory:*", "since": ""})
    replayed, subscribed = await receive_events_until_subscribed(ws)
    assert [f["event"]["event_id"] for f in replayed] == [history[0].event_id, history[2].event_id]
    assert subscribed["replayed"] == 2


async def test_unknown_since_says_so_and_stays_live(users: dict[str, Any], connect: Any) -> None:
    ws = await connect(users["admin"])
    await ws.send_json_to({"type": "subscribe", "topic": "inventory:product", "since": "pruned-long-ago"})
    await expect_error(ws, "since_unknown")
    assert (await ws.receive_json_from())["type"] == "subscribed"
    sent = event("inventory:product")
    await forward(sent)
    await expect_event(ws, sent)


async def test_replay_limit(users: dict[str, Any], connect: Any, settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "WEBSOCKET_REPLAY_LIMIT": 2}
    history = await database_sync_to_async(store)(*(event("inventory:product", n=i) for i in range(4)))
    ws = await connect(users["admin"])
    await ws.send_json_to({"type": "subscribe", "topic": "inventory:product", "since": history[0].event_id})
    first, second = await ws.receive_json_from(), await ws.receive_json_from()
    assert [first["event"]["event_id"], second["event"]["event_id"]] == [e.event_id for e in history[1:3]]
    await expect_error(ws, "replay_limit")
    subscribed = await ws.receive_json_from()
    # Resuming from there gets the rest.
    assert subscribed["last_event_id"] == history[2].event_id
    await ws.send_json_to({"type": "subscribe", "topic": "inventory:product", "since": history[2].event_id})
    rest, _ = await receive_events_until_subscribed(ws)
    assert [f["event"]["event_id"] for f in rest] == [history[3].event_id]


async def test_last_event_id_is_the_newest_logged_event(users: dict[str, Any], connect: Any) -> None:
    history = await database_sync_to_async(store)(event("billing:invoice"), event("other:topic"))
    ws = await connect(users["admin"])
    frame = await subscribe(ws, "inventory:product")
    # Resuming with it replays exactly what comes after the subscription started.
    assert frame["last_event_id"] == history[-1].event_id


async def test_without_an_event_log(users: dict[str, Any], connect: Any, settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "STORE_EVENTS": False}
    ws = await connect(users["admin"])
    assert (await subscribe(ws, "inventory:product"))["last_event_id"] is None
    await ws.send_json_to({"type": "subscribe", "topic": "inventory:order", "since": "x"})
    await expect_error(ws, "since_unknown")
    assert (await ws.receive_json_from())["type"] == "subscribed"
