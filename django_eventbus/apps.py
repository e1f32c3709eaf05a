from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core.signals import setting_changed


class EventBusConfig(AppConfig):
    name = "django_eventbus"
    label = "django_eventbus"
    verbose_name = "Event bus"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Wiring only: checks register on import, receivers connect to the tracked models.
        from . import checks  # noqa: F401
        from .tracking import connect_signals

        connect_signals()
        setting_changed.connect(_on_setting_changed, dispatch_uid="django_eventbus.tracking")


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting == "EVENTBUS":
        from .tracking import connect_signals

        connect_signals()
