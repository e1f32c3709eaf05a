"""Websocket URL patterns to include in your ASGI application's ``URLRouter``.

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django_eventbus.channels.routing import websocket_urlpatterns

application = ProtocolTypeRouter({
    "http": django_asgi_app,
    "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
})
"""

from __future__ import annotations

from django.urls import path

from .consumer import EventsConsumer

__all__ = ["websocket_urlpatterns"]

websocket_urlpatterns = [
    path("ws/events/", EventsConsumer.as_asgi(), name="eventbus-events"),
]
