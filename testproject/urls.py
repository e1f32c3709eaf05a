from __future__ import annotations

from django.contrib import admin
from django.urls import path

from testproject.inventory.views import home

urlpatterns = [
    path("", home, name="home"),
    path("admin/", admin.site.urls),
]
