from __future__ import annotations

from django.contrib import admin

from .models import Order, Product, Shipment


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "price", "stock", "updated_at"]
    search_fields = ["name"]


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["product", "quantity", "created_at"]


admin.site.register(Shipment)
