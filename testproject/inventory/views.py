"""The demo's home page: the products, a form to add one, and a live feed of events."""

from __future__ import annotations

from decimal import Decimal

from django import forms
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from .models import Product


class ProductForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Product
        fields = ["name", "price", "stock"]


def home(request: HttpRequest) -> HttpResponse:
    """GET: the page. POST: add a product (its event then shows up in every open feed)."""
    can_add = request.user.has_perm("inventory.add_product")
    form = ProductForm(initial={"price": Decimal("9.90"), "stock": 10})
    if request.method == "POST":
        if not can_add:
            return redirect_to_login(request.get_full_path())
        form = ProductForm(request.POST)
        if form.is_valid():
            form.save()
            return redirect("home")
    context = {
        "products": Product.objects.order_by("name")[:200],
        "form": form,
        "can_add": can_add,
        "can_view": request.user.has_perm("inventory.view_product"),
    }
    return render(request, "inventory/home.html", context)
