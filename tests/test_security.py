"""Security properties that cross modules: the documented Redis ACL, secrets in URLs, excluded fields.

See SECURITY.md for the trust boundary these tests hold the code to.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio

from django_eventbus.events import Event, EventType
from django_eventbus.events.redis import RedisEventBus
from tests.services import require_redis

# -- the minimal Redis ACL of SECURITY.md ---------------------------------------------------------


@pytest.fixture
async def acl_users() -> AsyncIterator[tuple[str, str]]:
    """A publisher and a subscriber ACL user limited to one channel prefix, as SECURITY.md writes them."""
    url = require_redis()
    prefix = f"t{uuid.uuid4().hex[:12]}"
    admin = redis.asyncio.Redis.from_url(url)
    names = {"pub": f"eventbus-pub-{prefix}", "sub": f"eventbus-sub-{prefix}"}
    try:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL",
            "SETUSER",
            names["pub"],
            "reset",
            "on",
            ">pub-secret",
            "resetchannels",
            f"&{prefix}:*",
            "+publish",
            "+ping",
        )
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL",
            "SETUSER",
            names["sub"],
            "reset",
            "on",
            ">sub-secret",
            "resetchannels",
            f"&{prefix}:*",
            # PSUBSCRIBE needs its glob listed literally: &prefix:* covers only the pattern "*".
            f"&{prefix}:inventory:*",
            "+subscribe",
            "+psubscribe",
            "+unsubscribe",
            "+punsubscribe",
            "+ping",
        )
        yield prefix, url
    finally:
        for name in names.values():
            await admin.execute_command("ACL", "DELUSER", name)  # type: ignore[no-untyped-call]
        await admin.aclose()


async def test_the_documented_redis_acl_is_enough_and_confines_the_bus(
    acl_users: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    prefix, url = acl_users
    publisher = RedisEventBus(
        url=url, username=f"eventbus-pub-{prefix}", password="pub-secret", channel_prefix=prefix
    )
    subscriber = RedisEventBus(
        url=url, username=f"eventbus-sub-{prefix}", password="sub-secret", channel_prefix=prefix
    )
    await publisher.connect()
    await subscriber.connect()
    try:
        got: list[Event] = []
        await subscriber.subscribe("inventory:product", got.append)
        await subscriber.subscribe("inventory:*", got.append, pattern="inventory:*")
        sent = Event(type=EventType.CREATED, topic="inventory:product", payload={"n": 1})
        await publisher.publish("inventory:product", sent)
        async with asyncio.timeout(10):
            while len(got) < 2:  # once per subscription
                await asyncio.sleep(0.01)
        assert got == [sent, sent]
        assert not [r for r in caplog.records if "redis event bus" in r.getMessage()]
    finally:
        await publisher.close()
        await subscriber.close()
    # The publisher's password cannot PUBLISH outside the prefix, nor read keys.
    other = redis.asyncio.Redis.from_url(url, username=f"eventbus-pub-{prefix}", password="pub-secret")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            await other.publish("elsewhere:x", "forged")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await other.get("any-key")
    finally:
        await other.aclose()


# -- passwords in bus URLs ---------------------------------------------------------------------------

SECRET = "s3cret-pw-4f9a"


def closed_port() -> int:
    from tests.services import free_port

    return free_port()  # bound and released: nothing listens there


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_a_bus_password_is_in_no_exception_or_log_line(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    from django_eventbus.events import create_event_bus

    port = closed_port()
    url = (
        f"redis://user:{SECRET}@127.0.0.1:{port}/0"
        if kind == "redis"
        else f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/postgres"
    )
    config = {"backend": kind, "url": url} if kind == "redis" else {"backend": kind, "connection_string": url}
    with caplog.at_level(logging.DEBUG):
        bus = create_event_bus(config)
        try:
            with pytest.raises(Exception) as failure:  # noqa: B017 -- any error, as long as it is quiet
                await asyncio.wait_for(bus.connect(), 20)
        finally:
            await bus.close()
    seen = [repr(failure.value), str(failure.value), *(repr(e) for e in chain(failure.value))]
    seen += [r.getMessage() + (caplog.text or "") for r in caplog.records]
    assert not [text for text in seen if SECRET in text]


def chain(exc: BaseException) -> list[BaseException]:
    found = []
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        found.append(exc)
    return found


@pytest.mark.django_db
def test_a_bus_password_is_in_no_status_or_check_output(settings: Any) -> None:
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError, SystemCheckError

    port = closed_port()
    outputs = []
    for bus in (
        f"redis://user:{SECRET}@127.0.0.1:{port}/0",
        f"redis://user:{SECRET}@127.0.0.1:notaport/0",
        f"nosuch://user:{SECRET}@host/0",
        {"backend": "redis", "url": f"redis://:{SECRET}@127.0.0.1:{port}/0", "nonsense": 1},
    ):
        settings.EVENTBUS = {**settings.EVENTBUS, "BUS": bus}
        for command in ("eventbus_status", "check"):
            out, err = StringIO(), StringIO()
            try:
                call_command(command, stdout=out, stderr=err)
            except (CommandError, SystemCheckError, SystemExit) as exc:
                outputs.append(str(exc))
            outputs += [out.getvalue(), err.getvalue()]
    assert outputs and not [text for text in outputs if SECRET in text]


# -- an excluded field's value, followed through every outlet ----------------------------------------

HIDDEN = "hidden-7c1e-value"
HIDDEN_TOO = "hidden-9d2b-update"


@pytest.mark.parametrize("capture", ["signals", "database"])
async def test_an_excluded_value_reaches_no_outlet(
    use_bus: Any, transactional_db: Any, settings: Any, capture: str
) -> None:
    """Shipment.secret is excluded (testproject settings): its values must not leave the model.

    Followed through the log rows, the raw Redis messages, the websocket frames, the admin's
    list and change pages and eventbus_listen's output, for a create, an update of the
    secret and another field, and a delete; with either capture mode (database capture:
    the trigger writes the log, the relay publishes it).
    """
    from channels.db import database_sync_to_async
    from django.db import connection

    from django_eventbus.capture import triggers as capture_database
    from django_eventbus.delivery.relay import Relay
    from django_eventbus.events import create_event_bus

    bus = use_bus("redis")["BUS"]
    relay: Relay | None = None
    if capture == "database":
        if connection.vendor != "postgresql":
            pytest.skip("database capture needs Django's database on PostgreSQL")
        settings.EVENTBUS = {**settings.EVENTBUS, "CAPTURE": "database"}
        await database_sync_to_async(capture_database.install)()
        relay_bus: Any = create_event_bus(bus)
        await relay_bus.connect()
        relay = Relay(relay_bus, interval=0.05)
        await relay.start()
    try:
        await _follow_the_secret(bus)
    finally:
        if relay is not None:
            await relay.stop()
            await relay.bus.close()
            settings.EVENTBUS = {**settings.EVENTBUS, "CAPTURE": "signals"}
            await database_sync_to_async(capture_database.uninstall)("default")


async def _follow_the_secret(bus: dict[str, Any]) -> None:
    from channels.db import database_sync_to_async
    from channels.testing import WebsocketCommunicator
    from django.test import Client
    from django.urls import reverse

    from django_eventbus.delivery.runtime import get_runner
    from django_eventbus.models import StoredEvent
    from testproject.inventory.models import Product, Shipment
    from tests.websocket_support import Server, make_user, stack_env, with_user

    wire = redis.asyncio.Redis.from_url(bus["url"])
    pubsub = wire.pubsub()
    await pubsub.psubscribe(f"{bus['channel_prefix']}:*")
    await pubsub.get_message(timeout=5)  # the psubscribe confirmation

    def write() -> list[str]:
        product = Product.objects.create(name="crate")
        shipment = Shipment.objects.create(product=product, weight="1.5", secret=HIDDEN)
        shipment.secret, shipment.weight = HIDDEN_TOO, "2.5"  # "changed" must name the weight only
        shipment.save()
        shipment.delete()
        get_runner().flush()
        rows = StoredEvent.objects.filter(topic="inventory:shipment").order_by("id")
        return list(rows.values_list("event_id", flat=True))

    ids = await database_sync_to_async(write)()
    assert len(ids) == 3  # created, updated, deleted
    seen: dict[str, list[str]] = {"log": [], "bus": [], "websocket": [], "admin": [], "listen": []}
    seen["log"] = await database_sync_to_async(
        lambda: [str(row) for row in StoredEvent.objects.values_list("payload", "metadata")]
    )()

    async with asyncio.timeout(10):
        while len(seen["bus"]) < 4:  # the product's event, then the shipment's three
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                seen["bus"].append(message["data"].decode())
    await pubsub.aclose()
    await wire.aclose()

    admin = await database_sync_to_async(make_user)("admin", superuser=True)
    ws = WebsocketCommunicator(with_user(admin), "/ws/events/")
    assert (await ws.connect())[0]
    try:
        await ws.send_json_to({"type": "subscribe", "topic": "inventory:*", "since": ""})
        while '"subscribed"' not in (seen["websocket"][-1] if seen["websocket"] else ""):
            seen["websocket"].append(await ws.receive_from(timeout=5))
    finally:
        await ws.disconnect()

    def admin_pages() -> list[str]:
        client = Client()
        client.force_login(admin)
        pages = [reverse("admin:django_eventbus_storedevent_changelist")]
        pages += [
            reverse("admin:django_eventbus_storedevent_change", args=[pk])
            for pk in StoredEvent.objects.values_list("pk", flat=True)
        ]
        return [client.get(page).content.decode() for page in pages]

    seen["admin"] = await database_sync_to_async(admin_pages)()

    env = await database_sync_to_async(stack_env)(bus_url=bus["url"], bus_prefix=bus["channel_prefix"])
    listen = Server(
        "listen",
        [
            sys.executable,
            "manage.py",
            "eventbus_listen",
            "inventory:*",
            "--json",
            "--since",
            "2000-01-01T00:00:00Z",
        ],
        env,
    )
    try:
        await asyncio.to_thread(listen.wait_for_output, ids[-1])
        seen["listen"] = [listen.output()]
    finally:
        listen.stop()

    assert all(seen.values()), {k: len(v) for k, v in seen.items()}
    assert ids[0] in seen["bus"][1] and ids[0] in "".join(seen["websocket"])  # they carry the events
    leaks = {where: [t for t in texts if HIDDEN in t or HIDDEN_TOO in t] for where, texts in seen.items()}
    assert leaks == {where: [] for where in seen}
