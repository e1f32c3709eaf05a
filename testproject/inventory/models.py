"""The demo's models: products and the orders that reference them."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.db import models

from django_eventbus.capture.querysets import EventBusManager


class Tag(models.Model):
    """A label of products: the demo's many-to-many relation (its changes are product events)."""

    name = models.CharField(max_length=50, unique=True)

    def __str__(self) -> str:
        return self.name


class Product(models.Model):
    name = models.CharField(max_length=200)
    sku = models.UUIDField(default=uuid.uuid4, unique=True)
    price = models.DecimalField(max_digits=10, decimal_places=2, default=Decimal("0.00"))
    stock = models.IntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="products")

    # Bulk writes (bulk_create, bulk_update, update) emit events too.
    objects = EventBusManager["Product"]()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Order(models.Model):
    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="orders")
    quantity = models.PositiveIntegerField(default=1)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product_id}"


class Color:
    """A value type the database knows nothing about (stored as "#rrggbb")."""

    def __init__(self, red: int, green: int, blue: int) -> None:
        self.rgb = (red, green, blue)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Color) and other.rgb == self.rgb

    def __hash__(self) -> int:
        return hash(self.rgb)

    def __str__(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.rgb)


class ColorField(models.CharField):  # type: ignore[type-arg]  # Field is not subscriptable at runtime
    """A custom field: events carry it through ``value_to_string``, as dumpdata does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 7)
        super().__init__(*args, **kwargs)

    def from_db_value(self, value: str | None, expression: object, connection: object) -> Color | None:
        return self.to_python(value)

    def to_python(self, value: object) -> Color | None:
        if value is None or isinstance(value, Color):
            return value
        text = str(value).lstrip("#")
        return Color(int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))

    def get_prep_value(self, value: object) -> str | None:
        return None if value is None else str(self.to_python(value))

    def value_to_string(self, obj: models.Model) -> str:
        value = self.value_from_object(obj)
        return "" if value is None else str(value)


class Shipment(models.Model):
    """Every kind of field value an event payload must carry faithfully."""

    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="shipments")
    reference = models.UUIDField(default=uuid.uuid4)
    weight = models.DecimalField(max_digits=12, decimal_places=4)
    shipped_at = models.DateTimeField(null=True, blank=True)
    due = models.DateField(null=True, blank=True)
    window_start = models.TimeField(null=True, blank=True)
    transit = models.DurationField(null=True, blank=True)
    label = models.FileField(upload_to="labels/", blank=True)
    details = models.JSONField(default=dict, blank=True)
    tags = models.JSONField(default=list, blank=True)
    color = ColorField(null=True, blank=True)
    secret = models.CharField(max_length=50, blank=True)
