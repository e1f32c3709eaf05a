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
        # Wiring only: checks register on import, receivers connect to the tracked models,
        # consumer modules are imported so their decorators register.
        from django.utils.module_loading import autodiscover_modules

        from . import checks  # noqa: F401
        from .consumers import register_celery_routes
        from .tracking import connect_signals

        connect_signals()
        register_celery_routes()
        autodiscover_modules(self._consumers_module())
        from .channels import setup as setup_channels

        setup_channels()
        setting_changed.connect(_on_setting_changed, dispatch_uid="django_eventbus.tracking")

    @staticmethod
    def _consumers_module() -> str:
        from .conf import conf

        return conf.CONSUMERS_MODULE


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting == "EVENTBUS":
        from .consumers import register_celery_routes
        from .tracking import connect_signals

        connect_signals()
        register_celery_routes()
