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
        from .capture.tracking import connect_signals
        from .delivery.consumers import register_celery_routes

        connect_signals()
        register_celery_routes()
        autodiscover_modules(self._consumers_module())
        from .channels import setup as setup_channels

        setup_channels()
        setting_changed.connect(_on_setting_changed, dispatch_uid="django_eventbus.settings")
        # Database capture: triggers kept current by every migrate, context handed to them.
        from django.db.backends.signals import connection_created
        from django.db.models.signals import post_migrate

        from .capture.trigger_context import install_on_connection
        from .capture.triggers import on_post_migrate

        post_migrate.connect(on_post_migrate, sender=self, dispatch_uid="django_eventbus.capture")
        connection_created.connect(install_on_connection, dispatch_uid="django_eventbus.capture")

    @staticmethod
    def _consumers_module() -> str:
        from .conf import conf

        return conf.CONSUMERS_MODULE


#: The settings something in the app is built from (everything else is read live through ``conf``).
WATCHED_SETTINGS = frozenset({"EVENTBUS", "DATABASES", "CHANNEL_LAYERS"})


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    """The app's one ``setting_changed`` receiver: rebuild what was built from settings.

    In a fixed order, whatever order the modules were imported in: the process's bus
    (the transport), then capture (signal receivers of the tracked models), then
    delivery (Celery routes, the Channels forwarder).
    """
    if setting not in WATCHED_SETTINGS:
        return
    from .channels import setup as setup_channels
    from .delivery.runtime import reset_if_bus_changed

    if setting in ("EVENTBUS", "DATABASES"):
        reset_if_bus_changed()
    if setting == "EVENTBUS":
        from .capture.tracking import connect_signals
        from .delivery.consumers import register_celery_routes

        connect_signals()
        register_celery_routes()
    if setting in ("EVENTBUS", "CHANNEL_LAYERS"):
        setup_channels()
