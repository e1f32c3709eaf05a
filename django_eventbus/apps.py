from __future__ import annotations

from django.apps import AppConfig


class EventBusConfig(AppConfig):
    name = "django_eventbus"
    label = "django_eventbus"
    verbose_name = "Event bus"
    default_auto_field = "django.db.models.BigAutoField"
