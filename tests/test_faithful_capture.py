"""The event log equals the table: replaying a model's logged events rebuilds its rows.

Whatever the instance in memory believes (stale, refreshed, loaded before another
writer), the signal capture logs what the database stores, with an exact ``changed``
or none; and in autocommit the row and its event commit together or not at all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.core.checks import Error
from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, connection, connections, transaction
from django.db.models.signals import post_delete, post_save
from django.test.utils import override_settings

import django_eventbus
from django_eventbus.capture.payloads import instance_payload
from django_eventbus.capture.publishing import make_event
from django_eventbus.capture.tracking import tracking_for
from django_eventbus.checks import check_settings
from django_eventbus.models import StoredEvent
from django_eventbus.testing import CapturedEvents
from testproject.inventory.models import Product, Shipment, Tag

pytestmark = pytest.mark.django_db(transaction=True)


def logged(topic: str = "inventory:product") -> list[StoredEvent]:
    return list(StoredEvent.objects.filter(topic=topic).order_by("id"))


def projection(topic: str = "inventory:product", check_changed: bool = True) -> dict[Any, dict[str, Any]]:
    """Apply the logged events in log order; check every ``changed`` against the state it replaces."""
    rows: dict[Any, dict[str, Any]] = {}
    for event in logged(topic):
        pk, fields = event.payload["pk"], event.payload["fields"]
        if event.type == "deleted":
            del rows[pk]
            continue
        previous = rows.get(pk)
        if event.type == "updated" and check_changed and "changed" in event.payload:
            assert previous is not None, f"UPDATED before CREATED for {pk}"
            changed = event.payload["changed"]
            for name, value in fields.items():
                # Only a many-to-many list can be missing: empty until its first m2m event.
                old = previous.get(name, [])
                if name in changed:
                    assert changed[name] == [old, value], (event.id, name)
                else:
                    assert old == value, (event.id, name, "changed but not in changed")
        rows[pk] = {**(previous or {}), **fields}
    return rows


def table(model: Any = Product) -> dict[Any, dict[str, Any]]:
    tracking = tracking_for(model)
    assert tracking is not None
    return {obj.pk: instance_payload(obj, tracking.fields)["fields"] for obj in model.objects.all()}


def test_a_stale_instance_saving_the_old_value_back_is_logged() -> None:
    product = Product.objects.create(name="p", price=Decimal("1"))
    a, b = Product.objects.get(pk=product.pk), Product.objects.get(pk=product.pk)
    a.price = Decimal("5")
    a.save()
    b.price = Decimal("1")  # b still holds 1.00 in memory: a snapshot would say "nothing changed"
    b.save()
    events = logged()
    assert [e.type for e in events] == ["created", "updated", "updated"]
    assert events[1].payload["changed"]["price"] == ["1.00", "5.00"]
    assert events[2].payload["changed"]["price"] == ["5.00", "1.00"]
    assert projection() == table()


def test_refresh_from_db_and_get_after_another_writer_give_exact_changed() -> None:
    product = Product.objects.create(name="p", price=Decimal("1"), stock=3)
    Product.objects.filter(pk=product.pk).update(price=Decimal("5"))  # another writer
    product.refresh_from_db()
    product.price = Decimal("1")
    product.save()
    assert logged()[-1].payload["changed"]["price"] == ["5.00", "1.00"]
    other = Product.objects.get(pk=product.pk)
    product.stock = 9
    product.save()  # `other` is stale now
    other.stock = 3
    other.save(update_fields=["stock"])
    last = logged()[-1].payload
    assert last["changed"] == {"stock": [9, 3]}
    assert last["fields"]["price"] == "1.00"  # update_fields: the other fields as stored
    assert projection() == table()


def test_update_fields_publishes_the_row_as_stored_not_stale_attributes() -> None:
    product = Product.objects.create(name="old", stock=1)
    stale = Product.objects.get(pk=product.pk)
    product.name = "new"
    product.save()
    stale.stock = 2
    stale.save(update_fields=["stock"])
    fields = logged()[-1].payload["fields"]
    assert fields["name"] == "new" and fields["stock"] == 2  # not the stale "old"
    assert projection() == table()


def test_f_expressions_are_read_back() -> None:
    from django.db.models import F

    product = Product.objects.create(name="p", stock=1)
    product.stock = F("stock") + 41
    product.save(update_fields=["stock"])
    assert logged()[-1].payload["changed"] == {"stock": [1, 42]}
    assert projection() == table()


def test_an_explicit_pk_insert_is_created_and_an_overwrite_has_no_changed() -> None:
    Product(pk=7001, name="new", sku=uuid.uuid4()).save()
    Product(pk=7001, name="overwritten", sku=uuid.uuid4()).save()
    events = logged()
    assert [e.type for e in events] == ["created", "updated"]
    assert "changed" not in events[1].payload  # unknown, so absent rather than wrong
    assert projection() == table()


def test_decimal_and_every_field_type_are_typed_by_the_field(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = str(tmp_path)
    product = Product.objects.create(name="p", price=7)  # an int, stored as 7.00
    assert logged()[-1].payload["fields"]["price"] == "7.00"
    Product.objects.create(name="default")
    assert logged()[-1].payload["fields"]["price"] == "0.00"
    # Values given as other Python types than the field's: the event carries what is stored.
    shipment = Shipment.objects.create(
        product=product,
        reference=str(uuid.uuid4()),
        weight=Decimal("7"),
        shipped_at="2026-03-04T05:06:07.890123+00:00",
        due="2026-12-24",
        window_start="08:30:15.000500",
        transit=dt.timedelta(days=2, microseconds=6),
        label="labels/label.pdf",
        details={"nested": [1, {"x": None}], "ünï": "cödé"},
        tags=["fragile"],
        color="#ff8000",
        secret="never-published",
    )
    fields = logged("inventory:shipment")[-1].payload["fields"]
    assert fields["weight"] == "7.0000"
    assert fields["color"] == "#ff8000" and "secret" not in fields
    assert projection("inventory:shipment") == table(Shipment)  # every field equals the stored row
    shipment.weight = Decimal("7.00")  # the same stored value
    shipment.save(update_fields=["weight"])
    assert logged("inventory:shipment")[-1].payload["changed"] == {}
    shipment.weight = "7.5"
    shipment.save(update_fields=["weight"])
    assert logged("inventory:shipment")[-1].payload["changed"] == {"weight": ["7.0000", "7.5000"]}
    assert projection("inventory:shipment") == table(Shipment)


def test_skip_unchanged_compares_with_the_stored_row(settings: Any) -> None:
    options = {"exclude": ["updated_at"], "skip_unchanged": True}
    settings.EVENTBUS = {**settings.EVENTBUS, "MODELS": {"inventory.Product": options}}
    product = Product.objects.create(name="p", price=Decimal("1"))
    stale = Product.objects.get(pk=product.pk)
    product.price = Decimal("5")
    product.save()
    stale.price = Decimal("1.0")  # equal to stale's snapshot, but not to the stored row: emitted
    stale.save()
    stale.price = 1  # equal to the stored 1.00: skipped
    stale.save()
    assert [e.type for e in logged()] == ["created", "updated", "updated"]
    assert logged()[-1].payload["changed"] == {"price": ["5.00", "1.00"]}


# --- autocommit: the row and its event commit together or not at all ---------------------------


@contextlib.contextmanager
def crash_after_the_row_write() -> Iterator[list[str]]:
    """A receiver connected after ours that raises: a crash between the row write and the log write."""
    calls: list[str] = []

    def explode(sender: Any, instance: Any, **kwargs: Any) -> None:
        calls.append(instance.name)
        raise RuntimeError("crash after the row was written")

    post_save.connect(explode, sender=Product, weak=False, dispatch_uid="test-explode")
    post_delete.connect(explode, sender=Product, weak=False, dispatch_uid="test-explode")
    try:
        yield calls
    finally:
        post_save.disconnect(sender=Product, dispatch_uid="test-explode")
        post_delete.disconnect(sender=Product, dispatch_uid="test-explode")


def assert_idle_in_autocommit() -> None:
    assert connection.get_autocommit() and not connection.in_atomic_block


def test_autocommit_crash_after_the_row_write_leaves_neither_row_nor_event() -> None:
    assert_idle_in_autocommit()
    with crash_after_the_row_write() as calls, pytest.raises(RuntimeError):
        Product.objects.create(name="created")
    assert calls == ["created"]  # the row had been written when it crashed
    assert not Product.objects.exists() and not StoredEvent.objects.exists()
    assert_idle_in_autocommit()


def test_autocommit_crash_in_update_and_delete_keeps_row_and_log_equal() -> None:
    product = Product.objects.create(name="kept", stock=1)
    product.stock = 2
    with crash_after_the_row_write() as calls:
        with pytest.raises(RuntimeError):
            product.save()
        with pytest.raises(RuntimeError):
            Product.objects.get(pk=product.pk).delete()
    assert calls == ["kept", "kept"]
    assert Product.objects.get(pk=product.pk).stock == 1
    assert [e.type for e in logged()] == ["created"]
    assert projection() == table()
    assert_idle_in_autocommit()


def test_autocommit_log_write_that_fails_rolls_the_row_back() -> None:
    clash = make_event("ops:clash")
    django_eventbus.publish("ops:clash", clash)  # autocommit: in the log now

    def publish_the_same_event(sender: Any, instance: Any, **kwargs: Any) -> None:
        django_eventbus.publish("ops:clash", clash)  # the log's unique index refuses it at commit

    post_save.connect(publish_the_same_event, sender=Product, weak=False, dispatch_uid="test-clash")
    try:
        with pytest.raises(IntegrityError):
            Product.objects.create(name="doomed")
    finally:
        post_save.disconnect(sender=Product, dispatch_uid="test-clash")
    assert not Product.objects.exists()
    assert not logged()
    assert_idle_in_autocommit()
    Product.objects.create(name="next")
    assert projection() == table()


def test_queryset_helpers_are_atomic_in_autocommit() -> None:
    products = Product.objects.bulk_create([Product(name=f"b{i}", stock=i) for i in range(3)])
    for p in products:
        p.stock += 10
    Product.objects.bulk_update(products, ["stock"])
    Product.objects.filter(stock__gte=10).update(price=Decimal("2.5"))
    assert [e.type for e in logged()] == ["created"] * 3 + ["updated"] * 6
    assert logged()[3].payload["changed"] == {"stock": [0, 10]}
    assert logged()[-1].payload["changed"] == {"price": ["0.00", "2.50"]}
    assert projection() == table()


# --- many-to-many ----------------------------------------------------------------------------------


def test_m2m_changes_from_either_side_become_updated_events() -> None:
    red, blue = Tag.objects.create(name="red"), Tag.objects.create(name="blue")
    lamp, desk = Product.objects.create(name="lamp"), Product.objects.create(name="desk")
    lamp.tags.add(red, blue)
    lamp.tags.add(red)  # already there: nothing written, nothing logged
    lamp.tags.remove(blue)
    blue.products.add(lamp, desk)  # the reverse side
    red.products.remove(lamp)
    blue.products.clear()
    desk.tags.set([red])
    summary = [
        (e.payload["pk"], e.payload["fields"].get("tags"), e.payload.get("changed"))
        for e in logged()
        if e.type == "updated"
    ]
    r, b = red.pk, blue.pk
    assert summary == [
        (lamp.pk, sorted([r, b]), {"tags": [[], sorted([r, b])]}),
        (lamp.pk, [r], {"tags": [sorted([r, b]), [r]]}),
        (lamp.pk, sorted([r, b]), {"tags": [[r], sorted([r, b])]}),  # one event per row, in pk order
        (desk.pk, [b], {"tags": [[], [b]]}),
        (lamp.pk, [b], {"tags": [sorted([r, b]), [b]]}),
        (lamp.pk, [], {"tags": [[b], []]}),
        (desk.pk, [], {"tags": [[b], []]}),
        (desk.pk, [r], {"tags": [[], [r]]}),
    ]
    # m2m events carry the row as stored too, so a projection stays complete
    rows = projection()
    for pk, row in table().items():
        assert {k: v for k, v in rows[pk].items() if k != "tags"} == row
        assert rows[pk]["tags"] == sorted(Product.objects.get(pk=pk).tags.values_list("pk", flat=True))


# --- multiple databases ----------------------------------------------------------------------------


class OtherDatabaseRouter:
    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "other" if model is Product else None


def test_a_router_sending_tracked_writes_elsewhere_is_a_check_error() -> None:
    with override_settings(DATABASE_ROUTERS=[OtherDatabaseRouter()]):
        errors = [e for e in check_settings() if e.id == "django_eventbus.E012"]
    assert len(errors) == 1 and isinstance(errors[0], Error)
    assert "inventory.Product" in errors[0].msg and "'other'" in errors[0].msg
    assert not [e for e in check_settings() if e.id == "django_eventbus.E012"]


def test_a_tracked_write_to_another_database_is_refused_before_it_happens(settings: Any) -> None:
    product = Product.objects.create(name="p")
    tag = Tag.objects.create(name="t")
    # The log lives on another alias than the one these writes go to.
    settings.EVENTBUS = {**settings.EVENTBUS, "DATABASE_ALIAS": "elsewhere"}
    product.stock = 5
    for write in (
        product.save,
        lambda: Product.objects.create(name="q"),
        product.delete,
        lambda: product.tags.add(tag),
        lambda: Product.objects.filter(pk=product.pk).update(stock=6),
        lambda: Product.objects.bulk_create([Product(name="r")]),
    ):
        with pytest.raises(ImproperlyConfigured, match="event log is on 'elsewhere'"):
            write()
    settings.EVENTBUS = {**settings.EVENTBUS, "DATABASE_ALIAS": "default"}
    assert list(Product.objects.values_list("name", "stock")) == [("p", 0)]
    assert not product.tags.exists()
    assert [e.type for e in logged()] == ["created"]


# --- concurrent writers on PostgreSQL --------------------------------------------------------------


@pytest.mark.pgdjango
@pytest.mark.slow
def test_concurrent_stale_writers_leave_a_log_that_rebuilds_the_table(
    captured_events: CapturedEvents,
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs Django's database to be PostgreSQL (DATABASE_URL=postgres://…)")
    pks = [Product.objects.create(name=f"row{i}", price=Decimal("1"), stock=1).pk for i in range(3)]
    threads, saves, failures = 4, 150, []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            stale = {pk: Product.objects.get(pk=pk) for pk in pks}  # loaded once, never refreshed
            for n in range(saves):
                product = stale[rng.choice(pks)]
                product.price = Decimal(rng.choice(["1", "2", "3.5"]))
                product.stock = rng.choice([1, 2, 3])
                with transaction.atomic():  # as under ATOMIC_REQUESTS
                    if n % 3 == 0:
                        product.save(update_fields=["stock"])
                    else:
                        product.save()
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            connections.close_all()

    workers = [threading.Thread(target=writer, args=(seed,)) for seed in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not failures, failures
    events = logged()
    assert len(events) == 3 + threads * saves  # every save that wrote the row, logged
    assert all("changed" in e.payload for e in events if e.type == "updated")
    assert projection() == table()  # every field of every row; each changed checked on the way
