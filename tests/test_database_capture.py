"""``EVENTBUS["CAPTURE"] = "database"``: PostgreSQL triggers log every writer's changes, exactly."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.contrib.auth.models import User
from django.core.checks import Error
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.db import connection, connections, transaction
from django.test import Client

import django_eventbus
from django_eventbus.capture import triggers as capture_database
from django_eventbus.capture.payloads import instance_payload
from django_eventbus.capture.tracking import tracking_for
from django_eventbus.checks import check_capture_triggers, check_settings
from django_eventbus.conf import conf, django_database_conninfo
from django_eventbus.models import StoredEvent
from testproject.inventory.models import Color, Order, Product, Shipment

pytestmark = [pytest.mark.pgdjango, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def database_capture(settings: Any, transactional_db: None) -> Iterator[None]:
    if connection.vendor != "postgresql":
        pytest.skip("needs Django's database to be PostgreSQL (DATABASE_URL=postgres://…)")
    settings.EVENTBUS = {**settings.EVENTBUS, "CAPTURE": "database"}
    capture_database.install()
    yield
    # Back to signals before the flush's post_migrate runs, and no trigger left for other tests.
    settings.EVENTBUS = {**settings.EVENTBUS, "CAPTURE": "signals"}
    capture_database.uninstall("default")


def logged(topic: str = "inventory:product") -> list[StoredEvent]:
    return list(StoredEvent.objects.filter(topic=topic).order_by("id"))


def table_fields(model: type[Any]) -> dict[Any, dict[str, Any]]:
    """pk -> the fields as the Python payload code encodes each row read from the table."""
    tracking = tracking_for(model)
    assert tracking is not None
    return {obj.pk: instance_payload(obj, tracking.fields)["fields"] for obj in model.objects.all()}


def projection(topic: str) -> dict[Any, dict[str, Any]]:
    """Apply the logged events in log order: what a read model built from them holds."""
    rows: dict[Any, dict[str, Any]] = {}
    for event in logged(topic):
        if event.type == "deleted":
            rows.pop(event.payload["pk"])
        else:
            rows[event.payload["pk"]] = event.payload["fields"]
    return rows


def test_queryset_update_of_three_rows_gives_three_exact_updates() -> None:
    products = [Product.objects.create(name=f"p{i}", price=Decimal(i), stock=i) for i in range(3)]
    StoredEvent.objects.all().delete()
    assert Product.objects.filter(pk__in=[p.pk for p in products]).update(stock=10, price="7") == 3
    events = logged()
    assert [e.type for e in events] == ["updated"] * 3
    assert all(e.relay for e in events)
    by_pk = {e.payload["pk"]: e.payload for e in events}
    for i, product in enumerate(products):
        payload = by_pk[product.pk]
        assert payload["model"] == "inventory.product"
        assert payload["changed"] == {"stock": [i, 10], "price": [f"{i}.00", "7.00"]}
        assert payload["fields"]["price"] == "7.00" and payload["fields"]["name"] == f"p{i}"
    assert projection("inventory:product") == table_fields(Product)


def test_bulk_create_gives_one_created_each_and_no_signal_events() -> None:
    Product.objects.bulk_create([Product(name=f"bulk{i}") for i in range(5)])
    Product.objects.create(name="single")  # the signal path is off: one event, not two
    events = logged()
    assert [e.type for e in events] == ["created"] * 6
    assert sorted(e.payload["fields"]["name"] for e in events) == [
        "bulk0",
        "bulk1",
        "bulk2",
        "bulk3",
        "bulk4",
        "single",
    ]
    assert projection("inventory:product") == table_fields(Product)


def test_delete_and_its_cascade_give_deleted_events() -> None:
    product = Product.objects.create(name="gone")
    pk = product.pk
    order_pks = sorted(Order.objects.create(product=product, quantity=q).pk for q in (1, 2))
    product.delete()
    assert [(e.type, e.payload["pk"]) for e in logged()] == [("created", pk), ("deleted", pk)]
    deleted = [e for e in logged("inventory:order") if e.type == "deleted"]
    assert sorted(e.payload["pk"] for e in deleted) == order_pks
    assert {e.payload["fields"]["product"] for e in deleted} == {pk}
    assert projection("inventory:product") == {} and projection("inventory:order") == {}


def test_an_update_from_another_client_without_django_is_captured_exactly() -> None:
    product = Product.objects.create(name="shared", price=Decimal("1.50"), stock=3)
    conninfo = django_database_conninfo(conf.DATABASE_ALIAS)
    with psycopg.connect(conninfo, autocommit=True, application_name="billing-service") as other:
        other.execute("UPDATE inventory_product SET price = price * 2, stock = 4 WHERE id = %s", [product.pk])
    update = logged()[-1]
    assert update.type == "updated" and update.payload["pk"] == product.pk
    assert update.payload["changed"] == {"price": ["1.50", "3.00"], "stock": [3, 4]}
    assert update.source == "billing-service" and update.correlation_id is None


def test_a_changed_primary_key_is_a_deleted_and_a_created_event() -> None:
    product = Product.objects.create(name="renumbered")
    old_pk, new_pk = product.pk, product.pk + 1000
    with connection.cursor() as cursor:
        cursor.execute("UPDATE inventory_product SET id = %s WHERE id = %s", [new_pk, old_pk])
    first, *renumbered = [(e.type, e.payload["pk"]) for e in logged()]
    assert first == ("created", old_pk)
    assert sorted(renumbered) == [("created", new_pk), ("deleted", old_pk)]  # one statement: any order
    assert projection("inventory:product") == table_fields(Product)


def test_copy_from_another_client_is_captured() -> None:
    conninfo = django_database_conninfo(conf.DATABASE_ALIAS)
    sku = uuid.uuid4()
    copy_sql = "COPY inventory_product (name, sku, price, stock, updated_at) FROM STDIN"
    with psycopg.connect(conninfo, autocommit=True) as other, other.cursor().copy(copy_sql) as copy:
        copy.write_row(
            ("copied", sku, Decimal("2.5"), 1, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
        )
    (event,) = logged()
    assert event.type == "created" and event.payload["fields"]["sku"] == str(sku)
    assert event.payload["fields"]["price"] == "2.50"
    assert event.payload["fields"]["updated_at"] == "2026-01-02T03:04:05+00:00"  # no ".000000", like Python
    assert event.source is not None
    assert event.source.startswith("postgresql:")  # no application_name: the server process


def test_rolled_back_block_and_savepoint_leave_no_events() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Product.objects.create(name="phantom")
        raise RuntimeError
    with transaction.atomic():
        Product.objects.create(name="kept")
        with pytest.raises(RuntimeError), transaction.atomic():
            Product.objects.filter(name="kept").update(stock=99)
            Product.objects.create(name="phantom in savepoint")
            raise RuntimeError
    assert [(e.type, e.payload["fields"]["name"]) for e in logged()] == [("created", "kept")]


def test_two_stale_instances_leave_the_log_equal_to_the_table() -> None:
    Product.objects.create(name="stale", price=Decimal("1"))
    a = Product.objects.get(name="stale")
    b = Product.objects.get(name="stale")
    a.price = Decimal("5")
    a.save()
    b.price = Decimal("1")
    b.save()  # b's snapshot says "1 -> 1", the row says "5 -> 1"
    updates = [e.payload["changed"]["price"] for e in logged() if e.type == "updated"]
    assert updates == [["1.00", "5.00"], ["5.00", "1.00"]]
    assert projection("inventory:product") == table_fields(Product)


def test_concurrent_writers_of_stale_instances_keep_the_projection_equal_to_the_table() -> None:
    pks = [Product.objects.create(name=f"hot{i}").pk for i in range(3)]
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            stale = [Product.objects.get(pk=pk) for pk in pks]  # loaded once, saved 150 times
            for i in range(150):
                instance = stale[(seed + i) % 3]
                instance.stock = seed * 1000 + i
                instance.price = Decimal(seed + i) / 4
                with transaction.atomic():
                    instance.save()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(logged()) == 3 + 600
    assert projection("inventory:product") == table_fields(Product)


def _shipment_values(product: Product, variant: int) -> dict[str, Any]:
    if variant == 0:
        return {
            "product": product,
            "reference": uuid.uuid4(),
            "weight": Decimal("1234.5678"),
            "shipped_at": dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.timezone.utc),
            "due": dt.date(2026, 12, 24),
            "window_start": dt.time(8, 30, 15, 500),
            "transit": dt.timedelta(days=2, hours=3, minutes=4, seconds=5, microseconds=6),
            "label": "labels/label.pdf",
            "details": {"nested": [1, {"x": None}], "ünï": "cödé", "n": 1.5},
            "tags": ["fragile", "urgent"],
            "color": Color(255, 128, 0),
            "secret": "never-logged",
        }
    return {  # the edges: whole seconds, negative durations, empty file, nulls, 7 as "7.0000"
        "product": product,
        "reference": uuid.uuid4(),
        "weight": Decimal("7"),
        "shipped_at": dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "due": None,
        "window_start": dt.time(23, 59, 59),
        "transit": -dt.timedelta(days=1, microseconds=1),
        "label": "",
        "details": {},
        "tags": [],
        "color": None,
        "secret": "still-never-logged",
    }


def typed(shipments: Any) -> dict[int, Shipment]:
    # Reading .label turns the loaded string into the field's FieldFile (name, or null for ""),
    # the typed value; typed payloads (issue 14 §1) do this for every field.
    for shipment in shipments:
        assert shipment.label is not None
    return {s.pk: s for s in shipments}


def test_trigger_payloads_equal_the_python_payloads_for_every_field_type() -> None:
    """The trigger encodes each field type exactly as the Python path does for the row read back.

    (The Python side is ``payloads.instance_payload`` of the instance loaded from the
    table, so each value has the field's own type.)
    """
    tracking = tracking_for(Shipment)
    assert tracking is not None
    product = Product.objects.create(name="p")
    first = Shipment.objects.create(**_shipment_values(product, 0))
    second = Shipment.objects.create(**_shipment_values(product, 1))
    before = typed(Shipment.objects.all())
    # Every tracked column changes, from one variant's values to the other's.
    for target, source in ((first, second), (second, first)):
        values = {
            k: v for k, v in _shipment_values(product, 0 if source is first else 1).items() if k != "product"
        }
        Shipment.objects.filter(pk=target.pk).update(**values)
    after = typed(Shipment.objects.all())
    events = logged("inventory:shipment")
    assert [e.type for e in events] == ["created", "created", "updated", "updated"]
    for event in events:
        pk = event.payload["pk"]
        if event.type == "created":
            assert event.payload == instance_payload(before[pk], tracking.fields)
            continue
        changed = {
            f.attname: (getattr(before[pk], f.attname), getattr(after[pk], f.attname))
            for f in tracking.fields
            if getattr(before[pk], f.attname) != getattr(after[pk], f.attname)
        }
        assert event.payload == instance_payload(after[pk], tracking.fields, changed)
        assert "reference" in event.payload["changed"] and "transit" in event.payload["changed"]
    # What the test compares against, written out for the edge variant:
    assert events[1].payload["fields"] | {"reference": "-", "id": 0, "product": 0} == {
        "id": 0,
        "product": 0,
        "reference": "-",
        "weight": "7.0000",
        "shipped_at": "2026-03-04T03:06:07+00:00",
        "due": None,
        "window_start": "23:59:59",
        "transit": "-P1DT00H00M00.000001S",
        "label": None,
        "details": {},
        "tags": [],
        "color": None,
    }


def test_excluded_field_is_never_logged_and_an_update_of_only_it_emits_nothing() -> None:
    product = Product.objects.create(name="p")
    shipment = Shipment.objects.create(**_shipment_values(product, 0))
    Shipment.objects.filter(pk=shipment.pk).update(secret="changed-secret")
    shipment.secret = "third-secret"
    shipment.save(update_fields=["secret"])
    Shipment.objects.filter(pk=shipment.pk).update(weight=Decimal("1"), secret="fourth-secret")
    shipment.delete()
    events = logged("inventory:shipment")
    assert [e.type for e in events] == ["created", "updated", "deleted"]
    assert events[1].payload["changed"] == {"weight": ["1234.5678", "1.0000"]}
    text = json.dumps([e.payload for e in StoredEvent.objects.all()])
    assert "secret" not in text


def test_events_setting_limits_what_the_trigger_logs(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "MODELS": {"inventory.Product": {"events": ["created"]}}}
    capture_database.install()
    product = Product.objects.create(name="only created")
    Product.objects.filter(pk=product.pk).update(stock=5)
    product.delete()
    assert [e.type for e in logged()] == ["created"]


def test_correlation_id_reaches_the_trigger_in_autocommit_and_in_atomic() -> None:
    with django_eventbus.correlation("req-auto"):
        Product.objects.create(name="autocommit")
        Product.objects.filter(name="autocommit").update(stock=2)
    Product.objects.create(name="after")  # the setting went with its statement
    with transaction.atomic():
        with django_eventbus.correlation("req-atomic"):
            Product.objects.create(name="atomic")
        Product.objects.create(name="later in the same transaction")
    rows = [(e.payload["fields"]["name"], e.correlation_id) for e in logged()]
    assert rows == [
        ("autocommit", "req-auto"),
        ("autocommit", "req-auto"),
        ("after", None),
        ("atomic", "req-atomic"),
        ("later in the same transaction", None),
    ]
    sources = {e.correlation_id: e.source for e in logged()}
    assert sources["req-auto"] == conf.SOURCE == sources["req-atomic"]
    # A quote or a percent sign in the id is data, not SQL.
    with django_eventbus.correlation("it's 100%"):
        assert Product.objects.filter(name="after").update(stock=3) == 1
        assert Product.objects.filter(name__startswith="a").count() == 3  # results are the query's own
    assert logged()[-1].correlation_id == "it's 100%"
    with django_eventbus.correlation("reads"), transaction.atomic():
        # A server-side cursor takes one statement: left alone, and the reads still work.
        assert len(list(Product.objects.iterator(chunk_size=2))) == 4


def test_correlation_id_from_the_request_middleware() -> None:
    client = Client()
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    response = client.post(
        "/", {"name": "via request", "price": "2.00", "stock": "1"}, HTTP_X_REQUEST_ID="req-42"
    )
    assert response.status_code == 302
    assert [(e.payload["fields"]["name"], e.correlation_id) for e in logged()] == [("via request", "req-42")]


def test_settings_change_is_reported_by_the_check_and_fixed_by_the_command(settings: Any) -> None:
    assert check_capture_triggers(databases=["default"]) == []
    settings.EVENTBUS = {**settings.EVENTBUS, "EXCLUDE_FIELDS": ["password", "stock"]}
    found = check_capture_triggers(databases=["default"])
    assert {(m.id, m.msg) for m in found} == {
        ("django_eventbus.E015", "The database capture trigger of inventory.product is outdated.")
    }
    assert "manage.py eventbus_triggers install --database default" in str(found[0].hint)
    with pytest.raises(SystemCheckError, match="E015"):
        call_command("check", databases=["default"])
    with pytest.raises(CommandError, match="eventbus_triggers install"):
        call_command("eventbus_triggers", "check")
    call_command("eventbus_triggers", "install")
    call_command("eventbus_triggers", "check")
    assert check_capture_triggers(databases=["default"]) == []
    Product.objects.create(name="no stock in the log", stock=3)
    assert "stock" not in logged()[-1].payload["fields"]


def test_eventbus_listen_refuses_to_start_on_an_outdated_trigger(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "EXCLUDE_FIELDS": ["password", "stock"]}
    with pytest.raises(SystemCheckError, match="eventbus_triggers install"):
        call_command("eventbus_listen", "inventory:*")


def test_a_model_no_longer_tracked_loses_its_trigger(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "MODELS": {"inventory.Order": {}}}
    assert {(m.msg.split(" is ")[0], m.id) for m in check_capture_triggers(databases=["default"])} == {
        ("The database capture trigger of inventory.product", "django_eventbus.E015"),
        ("The database capture trigger of inventory.shipment", "django_eventbus.E015"),
    }
    report = capture_database.install()
    assert sorted(report.removed) == ["inventory.product", "inventory.shipment"]
    Product.objects.create(name="untracked now")
    assert logged() == []


def test_switching_back_to_signals_is_reported_until_the_triggers_are_removed(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "CAPTURE": "signals"}
    found = check_capture_triggers(databases=["default"])
    assert len(found) == 3 and "log twice" in found[0].msg
    call_command("eventbus_triggers", "install")
    assert check_capture_triggers(databases=["default"]) == []


def test_migrate_installs_the_triggers_and_is_not_blocked_by_them() -> None:
    capture_database.uninstall()
    assert len(check_capture_triggers(databases=["default"])) == 3
    call_command("migrate", verbosity=0)
    assert capture_database.problems() == []


def test_a_disabled_trigger_is_reported() -> None:
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE inventory_order DISABLE TRIGGER USER")
    assert capture_database.problems() == [("inventory.order", "outdated")]
    capture_database.install()
    assert capture_database.problems() == []


def test_the_command_refuses_bad_arguments_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "eventbus_triggers", "frobnicate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "CommandError: unknown action 'frobnicate': use install, uninstall or check"
    ]
    result = subprocess.run(
        [sys.executable, "manage.py", "eventbus_triggers", "install", "--bogus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_capture_setting_checks(settings: Any) -> None:
    settings.EVENTBUS = {**settings.EVENTBUS, "CAPTURE": "triggers"}
    assert [e.id for e in check_settings() if isinstance(e, Error)] == ["django_eventbus.E016"]
    settings.EVENTBUS = {**settings.EVENTBUS, "CAPTURE": "database", "DATABASE_ALIAS": "nowhere"}
    assert "django_eventbus.E013" in [e.id for e in check_settings()]


# -- delivery: trigger -> log -> relay -> bus -> consumer ------------------------------


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_captured_writes_reach_a_durable_consumer_through_the_relay(kind: str, settings: Any) -> None:
    """ORM saves, QuerySet.update and a write from another client: each handled once, in log order.

    The relay polls every 60 s here, so what arrives within seconds was woken: by the
    after-commit NOTIFY of an ORM write, or (for the outside client) by that client's own
    NOTIFY, as docs/models.md tells such writers to do.
    """
    from django_eventbus.delivery.consumers import Consumer
    from django_eventbus.delivery.listener import Listener
    from django_eventbus.delivery.relay import WAKE_CHANNEL, Relay
    from django_eventbus.events import create_event_bus
    from tests.services import bus_setting

    settings.EVENTBUS = {**settings.EVENTBUS, "BUS": bus_setting(kind), "RELAY_INTERVAL": 60.0}
    seen: list[tuple[str, str, Any]] = []

    def handle(event: Any) -> None:
        seen.append((event.type.value, event.payload["fields"]["name"], event.payload.get("changed")))

    async def scenario() -> None:
        from tests.orm import orm

        bus: Any = create_event_bus(conf.bus_config())
        await bus.connect()
        consumer = Consumer(name=f"dbcap.{uuid.uuid4().hex[:8]}", pattern="inventory:product", func=handle)
        listener = Listener(bus, [consumer], interval=60.0)
        relay = Relay(bus, interval=60.0)
        await listener.start()
        await relay.start()
        try:
            deadline = time.monotonic() + 10
            while not relay.active:
                assert time.monotonic() < deadline, "the relay did not take its lock"
                await asyncio.sleep(0.02)

            def writes() -> None:
                lamp = Product.objects.create(name="lamp", price=Decimal("1.00"))
                with transaction.atomic():
                    Product.objects.filter(pk=lamp.pk).update(price=Decimal("2.50"))
                with psycopg.connect(django_database_conninfo("default"), autocommit=True) as other:
                    other.execute("UPDATE inventory_product SET name = 'desk' WHERE id = %s", [lamp.pk])
                    other.execute(f"NOTIFY {WAKE_CHANNEL}")

            await orm(writes)
            deadline = time.monotonic() + 15
            while len(seen) < 3:
                assert time.monotonic() < deadline, f"only {seen} within 15 s (the poll is 60 s)"
                await asyncio.sleep(0.02)
        finally:
            await relay.stop()
            await listener.stop()
            await bus.close()

    asyncio.run(scenario())
    assert seen == [
        ("created", "lamp", None),
        ("updated", "lamp", {"price": ["1.00", "2.50"]}),
        ("updated", "desk", {"name": ["lamp", "desk"]}),
    ]


def test_many_to_many_changes_are_captured_from_the_orm_signal() -> None:
    # A relation change is a row of the through table, which the model's trigger does not
    # see: m2m_changed still logs it, in the same format as under signal capture.
    from testproject.inventory.models import Tag

    lamp = Product.objects.create(name="lamp")
    red, blue = Tag.objects.create(name="red"), Tag.objects.create(name="blue")
    lamp.tags.add(red, blue)
    lamp.tags.remove(red)
    updates = [e.payload for e in logged() if e.type == "updated"]
    assert [u["changed"]["tags"] for u in updates] == [
        [[], sorted([red.pk, blue.pk])],
        [sorted([red.pk, blue.pk]), [blue.pk]],
    ]
    assert [e.type for e in logged()] == ["created", "updated", "updated"]
