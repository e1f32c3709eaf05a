"""Committed model changes become events: recorded in the same transaction, published after commit."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.db import IntegrityError, connection, models, transaction
from django.test import Client

import django_eventbus
from django_eventbus.capture.outbox import flush_pending
from django_eventbus.capture.publishing import make_event, publish
from django_eventbus.events import Event, EventSerializationError, EventType
from django_eventbus.models import StoredEvent
from django_eventbus.testing import CapturedEvents, capture_events
from testproject.inventory.models import Color, Order, Product, Shipment

pytestmark = pytest.mark.django_db(transaction=True)

PG_DJANGO = pytest.param("postgres-django", marks=pytest.mark.pgdjango)
BUSES = ["memory", "redis", "postgres", PG_DJANGO]


def test_create_update_delete_emit_events(captured_events: CapturedEvents) -> None:
    product = Product.objects.create(name="Lamp", price=Decimal("9.99"), stock=1)
    product.stock = 5
    product.save()
    pk = product.pk
    product.delete()
    captured_events.wait_for(3)
    assert captured_events.types() == ["created", "updated", "deleted"]
    assert captured_events.topics() == ["inventory:product"] * 3
    created, updated, deleted = captured_events
    assert created.payload["model"] == "inventory.product"
    assert created.payload["pk"] == pk
    assert created.payload["fields"]["name"] == "Lamp"
    assert created.payload["fields"]["price"] == "9.99"
    assert "changed" not in created.payload
    assert updated.payload["changed"]["stock"] == [1, 5]
    assert set(updated.payload["changed"]) == {"stock", "updated_at"}
    assert deleted.payload["pk"] == pk and deleted.payload["fields"]["stock"] == 5
    # every event is in the log, with the same id, in order
    logged = list(StoredEvent.objects.order_by("id").values_list("event_id", "type"))
    assert logged == [(e.event_id, e.type.value) for e in captured_events]


def test_every_save_emits_even_when_nothing_tracked_changed(
    settings: Any, captured_events: CapturedEvents
) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "MODELS": {"inventory.Product": {"exclude": ["updated_at"]}}}
    product = Product.objects.create(name="Chair")
    product.save()  # writes the row again: an event, with nothing changed
    product.name = "Stool"
    product.save(update_fields=["name"])
    captured_events.wait_for(3)
    assert captured_events.types() == ["created", "updated", "updated"]
    assert captured_events[1].payload["changed"] == {}
    assert captured_events[2].payload["changed"] == {"name": ["Chair", "Stool"]}
    assert "updated_at" not in captured_events[2].payload["fields"]


def test_skip_unchanged_drops_updates_that_change_no_tracked_field(
    settings: Any, captured_events: CapturedEvents
) -> None:
    options = {"exclude": ["updated_at"], "skip_unchanged": True}
    settings.EVENTBUS = {**settings.EVENTBUS, "MODELS": {"inventory.Product": options}}
    product = Product.objects.create(name="Chair")
    product.save()  # equal to the stored row: nothing
    product.name = "Stool"
    product.save(update_fields=["name"])
    captured_events.wait_for(2)
    assert captured_events.types() == ["created", "updated"]
    assert captured_events[1].payload["changed"] == {"name": ["Chair", "Stool"]}


def test_update_of_an_instance_not_loaded_says_nothing_about_changes(captured_events: CapturedEvents) -> None:
    product = Product.objects.create(name="A")
    Product(pk=product.pk, name="B", sku=product.sku).save()
    captured_events.wait_for(2)
    assert "changed" not in captured_events[1].payload  # unknown, so absent rather than wrong


def test_rollback_emits_nothing_and_logs_nothing(captured_events: CapturedEvents) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Product.objects.create(name="Ghost")
        raise RuntimeError
    assert StoredEvent.objects.count() == 0
    Product.objects.create(name="Real")
    captured_events.wait_for(1)
    assert [e.payload["fields"]["name"] for e in captured_events] == ["Real"]


def test_savepoint_rollback_inside_committed_transaction(captured_events: CapturedEvents) -> None:
    with transaction.atomic():
        first = Product.objects.create(name="first")
        try:
            with transaction.atomic():
                Product.objects.create(name="rolled-back")
                raise ValueError
        except ValueError:
            pass
        with transaction.atomic():
            Product.objects.create(name="kept-savepoint")
        first.name = "first-renamed"
        first.save()
        assert captured_events == []  # nothing before commit
    captured_events.wait_for(3)
    names = [e.payload["fields"]["name"] for e in captured_events]
    assert names == ["first", "kept-savepoint", "first-renamed"]  # commit order, rolled back one absent
    assert sorted(StoredEvent.objects.values_list("payload__fields__name", flat=True)) == sorted(names)


def test_log_rows_are_written_when_emitted_and_published_after_commit() -> None:
    with capture_events() as events, transaction.atomic():
        Product.objects.create(name="P")
        # In the log at once (this transaction sees its own rows); published only after commit.
        assert StoredEvent.objects.count() == 1
        assert len(events) == 0
    assert StoredEvent.objects.count() == 1
    events.wait_for(1)


def test_a_log_write_that_fails_at_commit_rolls_the_change_back(captured_events: CapturedEvents) -> None:
    """The log row is in the same transaction as the change: if it cannot be written, nothing commits."""
    clash = make_event("ops:clash")
    publish("ops:clash", clash)  # autocommit: in the log now
    with pytest.raises(IntegrityError), transaction.atomic():
        Product.objects.create(name="Doomed")
        publish("ops:clash", clash)  # same event_id: the log's unique index refuses it
    assert not Product.objects.filter(name="Doomed").exists()
    assert StoredEvent.objects.filter(event_id=clash.event_id).count() == 1
    # The connection is usable and the next transaction is recorded as usual.
    Product.objects.create(name="Next")
    captured_events.wait_for(2)
    assert [e.topic for e in captured_events] == ["ops:clash", "inventory:product"]
    assert StoredEvent.objects.count() == 2


def test_store_events_off_writes_no_log(settings: Any, captured_events: CapturedEvents) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "STORE_EVENTS": False}
    Product.objects.create(name="P")
    captured_events.wait_for(1)
    assert StoredEvent.objects.count() == 0


def test_loaddata_emits_nothing_unless_asked(settings: Any, tmp_path: Any) -> None:
    fixture = tmp_path / "products.json"
    fixture.write_text(
        json.dumps(
            [
                {
                    "model": "inventory.product",
                    "pk": 50,
                    "fields": {"name": "F", "sku": str(uuid.uuid4()), "updated_at": "2026-01-01T00:00:00Z"},
                }
            ]
        )
    )
    with capture_events() as events:
        call_command("loaddata", str(fixture), verbosity=0)
    assert events == [] and StoredEvent.objects.count() == 0
    settings.EVENTBUS = {**settings.EVENTBUS, "EMIT_RAW": True}
    with capture_events() as events:
        call_command("loaddata", str(fixture), verbosity=0)
    events.wait_for(1)
    assert events.types() == ["updated"]  # the row from the first loaddata is updated
    assert StoredEvent.objects.count() == 1


def test_events_of_one_transaction_keep_their_order(captured_events: CapturedEvents) -> None:
    with transaction.atomic():
        products = [Product.objects.create(name=f"p{i}") for i in range(20)]
        for p in products[::2]:
            p.delete()
    captured_events.wait_for(30)
    assert [(e.type.value, e.payload["fields"]["name"]) for e in captured_events] == [
        ("created", f"p{i}") for i in range(20)
    ] + [("deleted", f"p{i}") for i in range(0, 20, 2)]


def test_correlation_id_from_request_header_and_generated(captured_events: CapturedEvents) -> None:
    admin = User.objects.create_superuser("admin", "a@example.com", "pw")
    client = Client()
    client.force_login(admin)
    response = client.post(
        "/admin/inventory/product/add/",
        {"name": "From admin", "sku": str(uuid.uuid4()), "price": "3.50", "stock": "2"},
        HTTP_X_REQUEST_ID="req-123",
    )
    assert response.status_code == 302, response.content[:500]
    assert response["X-Correlation-ID"] == "req-123"
    product = Product.objects.get(name="From admin")
    response = client.post(
        f"/admin/inventory/product/{product.pk}/delete/", {"post": "yes"}, HTTP_X_CORRELATION_ID="corr-9"
    )
    assert response.status_code == 302
    client.get("/admin/", HTTP_X_REQUEST_ID="bad id with spaces")
    captured_events.wait_for(2)
    product_events = [e for e in captured_events if e.topic == "inventory:product"]
    assert [(e.type.value, e.correlation_id) for e in product_events] == [
        ("created", "req-123"),
        ("deleted", "corr-9"),
    ]
    assert product_events[0].payload["fields"]["price"] == "3.50"


def test_source_names_the_process_and_is_configurable(settings: Any, captured_events: CapturedEvents) -> None:
    import os
    import socket

    Product.objects.create(name="a")
    settings.EVENTBUS = {**settings.EVENTBUS, "SOURCE": "web-1"}
    Product.objects.create(name="b")
    captured_events.wait_for(2)
    assert captured_events[0].source == f"{socket.gethostname()}:{os.getpid()}"
    assert captured_events[1].source == "web-1"


def test_bulk_writes_emit_events_through_the_queryset(captured_events: CapturedEvents) -> None:
    created = Product.objects.bulk_create([Product(name=f"b{i}", stock=i) for i in range(3)])
    captured_events.wait_for(3)
    for p in created:
        p.stock += 10
    Product.objects.bulk_update(created, ["stock"])
    captured_events.wait_for(6)
    count = Product.objects.filter(name__in=["b0", "b1"]).update(stock=99)
    assert count == 2
    captured_events.wait_for(8)
    Product.objects.filter(name="b2").delete()
    captured_events.wait_for(9)
    assert captured_events.types() == ["created"] * 3 + ["updated"] * 3 + ["updated"] * 2 + ["deleted"]
    assert captured_events[3].payload["changed"] == {"stock": [0, 10]}
    assert sorted(e.payload["changed"]["stock"][1] for e in captured_events[6:8]) == [99, 99]
    assert sorted(e.payload["changed"]["stock"][0] for e in captured_events[6:8]) == [10, 11]


def test_emit_model_events_for_code_you_cannot_change(captured_events: CapturedEvents) -> None:
    product = Product.objects.create(name="p")
    orders = Order.objects.bulk_create([Order(product=product, quantity=q) for q in (1, 2)])  # plain manager
    captured_events.wait_for(1)
    assert captured_events.topics() == ["inventory:product"]  # bulk_create itself emitted nothing
    with transaction.atomic():
        emitted = django_eventbus.emit_model_events(orders, "created")
    captured_events.wait_for(3)
    assert [e.event_id for e in captured_events[1:]] == [e.event_id for e in emitted]
    assert [e.payload["fields"]["quantity"] for e in captured_events[1:]] == [1, 2]
    assert captured_events[1].payload["fields"]["product"] == product.pk


def test_publish_custom_events_on_commit(captured_events: CapturedEvents) -> None:
    with transaction.atomic():
        recorded = django_eventbus.publish(
            "billing:invoice", Event(type=EventType.CUSTOM, topic="billing:invoice", payload={"n": 1})
        )
        assert captured_events == []
    captured_events.wait_for(1)
    assert captured_events[0] == recorded and recorded.source
    assert StoredEvent.objects.get(event_id=recorded.event_id).topic == "billing:invoice"
    with pytest.raises(EventSerializationError):
        django_eventbus.publish("t", Event(type=EventType.CUSTOM, topic="t", payload={"d": dt.date.today()}))
    with pytest.raises(ValueError, match="must be equal"):
        django_eventbus.publish("x", Event(type=EventType.CUSTOM, topic="t"))
    assert StoredEvent.objects.count() == 1


async def test_apublish_from_async_code(captured_events: CapturedEvents) -> None:
    from asgiref.sync import sync_to_async
    from django.db import close_old_connections

    try:
        event = await django_eventbus.apublish(
            "async:t", django_eventbus.make_event("async:t", "custom", {"a": 1})
        )
        await asyncio.to_thread(captured_events.wait_for, 1)
        assert captured_events[0].event_id == event.event_id
        assert await StoredEvent.objects.filter(event_id=event.event_id).aexists()
    finally:
        # The ORM's thread opened a connection that no request cycle will close here.
        await sync_to_async(lambda: connection.close())()
        close_old_connections()


def test_third_party_model_from_settings_never_emits_password(
    settings: Any, captured_events: CapturedEvents
) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "MODELS": {"auth.User": {"topic": "accounts:user"}}}
    User.objects.create_user("bob", "b@example.com", "secret-pw")
    captured_events.wait_for(1)
    event = captured_events[0]
    assert event.topic == "accounts:user"
    assert event.payload["fields"]["username"] == "bob"
    assert "password" not in event.payload["fields"]


def test_track_decorator_registers_a_model(settings: Any) -> None:
    from django_eventbus.capture import tracking

    settings.EVENTBUS = {**settings.EVENTBUS, "MODELS": {}}
    try:
        django_eventbus.track("shop:orders", fields=["quantity"], events=["created"])(Order)
        product = Product.objects.create(name="x")  # no longer tracked
        with capture_events() as events:
            order = Order.objects.create(product=product, quantity=3)
            order.quantity = 4
            order.save()  # "updated" is not among the events
        events.wait_for(1)
        assert [(e.topic, e.type.value, dict(e.payload["fields"])) for e in events] == [
            ("shop:orders", "created", {"quantity": 3})
        ]
    finally:
        tracking._decorated.pop("inventory.order", None)
        tracking.connect_signals()


@pytest.mark.parametrize("bus", BUSES)
def test_every_field_type_round_trips_through_a_real_bus(
    bus: str, use_bus: Any, tmp_path: Any, settings: Any
) -> None:
    use_bus(bus)
    settings.MEDIA_ROOT = str(tmp_path)
    product = Product.objects.create(name="p")
    values: dict[str, Any] = {
        "reference": uuid.uuid4(),
        "weight": Decimal("1234.5678"),
        "shipped_at": dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.timezone.utc),
        "due": dt.date(2026, 12, 24),
        "window_start": dt.time(8, 30, 15, 500),
        "transit": dt.timedelta(days=2, hours=3, minutes=4, seconds=5, microseconds=6),
        "details": {"nested": [1, {"x": None}], "ünï": "cödé"},
        "tags": ["fragile", "urgent"],
        "color": Color(255, 128, 0),
    }
    with capture_events("inventory:shipment") as events:
        shipment = Shipment.objects.create(
            product=product,
            label=SimpleUploadedFile("label.pdf", b"%PDF-1.4"),
            secret="never-published",
            **values,
        )
        events.wait_for(1)  # network buses deliver a moment later: wait inside the block
    fields = events[0].payload["fields"]
    assert "secret" not in fields
    assert fields["product"] == product.pk
    assert fields["label"] == shipment.label.name and fields["label"].startswith("labels/label")
    for name, value in values.items():
        field = Shipment._meta.get_field(name)
        assert isinstance(field, models.Field)
        assert field.to_python(fields[name]) == value, name  # parses back to the very value
    # naive datetimes (USE_TZ off code paths) survive too
    assert Shipment._meta.get_field("shipped_at").to_python("2026-03-04T05:06:07") == dt.datetime(
        2026, 3, 4, 5, 6, 7
    )


@pytest.mark.parametrize("bus", ["redis", "postgres", PG_DJANGO])
def test_real_backends_deliver_model_events_and_nothing_on_rollback(bus: str, use_bus: Any) -> None:
    use_bus(bus)
    with capture_events("inventory:*") as events:
        with pytest.raises(RuntimeError), transaction.atomic():
            Product.objects.create(name="phantom")
            raise RuntimeError
        with transaction.atomic():
            Product.objects.create(name="real")
        events.wait_for(1)
        import time

        time.sleep(0.3)  # a phantom would show up by now
    assert [e.payload["fields"]["name"] for e in events] == ["real"]


@pytest.mark.pgdjango
def test_notify_on_djangos_database_is_sent_after_commit(use_bus: Any) -> None:
    settings_value = use_bus("postgres-django")
    import psycopg

    from django_eventbus.conf import conf

    prefix = settings_value["BUS"]["channel_prefix"]
    with psycopg.connect(conf.bus_config()["connection_string"], autocommit=True) as listener:
        listener.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(prefix)))

        def received() -> list[str]:
            return [n.payload for n in listener.notifies(timeout=0.3, stop_after=None)]

        with transaction.atomic():
            Product.objects.create(name="in-tx")
            assert received() == []  # not before commit
        flush_pending()  # the bus publishes from its own connection once the commit is done
        after = received()
        assert len(after) == 1 and json.loads(after[0])["payload"]["fields"]["name"] == "in-tx"
        with pytest.raises(RuntimeError), transaction.atomic():
            Product.objects.create(name="rolled")
            raise RuntimeError
        assert received() == []
    assert connection.vendor == "postgresql"


@pytest.mark.pgdjango
def test_a_tracked_save_adds_one_insert_and_no_notify_to_the_transaction(use_bus: Any) -> None:
    """The log row is one more INSERT in the transaction; the NOTIFY goes out after COMMIT."""
    from django.test.utils import CaptureQueriesContext

    tracked = use_bus("postgres-django")["MODELS"]
    use_bus("postgres-django", MODELS={})
    with CaptureQueriesContext(connection) as untracked, transaction.atomic():
        Product.objects.create(name="not counted")
    use_bus("postgres-django", MODELS=tracked)
    with capture_events("inventory:*") as events:
        with CaptureQueriesContext(connection) as queries, transaction.atomic():
            Product.objects.create(name="counted")
        events.wait_for(1)
    assert [q["sql"][:6] for q in untracked.captured_queries] == ["BEGIN", "INSERT", "COMMIT"]
    sql = [q["sql"] for q in queries.captured_queries]
    assert [q[:6] for q in sql] == ["BEGIN", "INSERT", "INSERT", "COMMIT"], sql
    assert sql[2].startswith('INSERT INTO "django_eventbus_event"')
    assert not any("notify" in q.lower() for q in sql)  # no global notify lock at this COMMIT
    assert StoredEvent.objects.filter(payload__fields__name="counted").count() == 1


def test_callbacks_run_by_hand_still_write_the_log(django_capture_on_commit_callbacks: Any) -> None:
    # TestCase.captureOnCommitCallbacks(execute=True) runs on_commit callbacks without a
    # commit: the rows are in the log already (written when emitted), and roll back with it.
    with transaction.atomic():  # what TestCase wraps each test in (never committed)
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            Product.objects.create(name="in a TestCase")
        assert len(callbacks) == 1
        assert StoredEvent.objects.filter(payload__fields__name="in a TestCase").count() == 1
        transaction.set_rollback(True)
    assert not StoredEvent.objects.exists()
