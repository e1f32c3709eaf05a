"""ASGI entry point: Django for HTTP, the event websocket at ``ws/events/``.

``python manage.py runserver`` serves it with daphne (first in INSTALLED_APPS);
in production: ``daphne testproject.asgi:application`` (or uvicorn).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
# Set up Django (apps, models) before anything imports a model: the consumer does.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from django_eventbus.channels.routing import websocket_urlpatterns  # noqa: E402

# Static files (the browser client) also when served by a bare `daphne`, not only by
# runserver; a production deployment serves them from STATIC_ROOT instead.
http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.DEBUG else django_asgi_app

application = ProtocolTypeRouter(
    {
        "http": http_app,
        # Browsers send an Origin: only pages of this site (ALLOWED_HOSTS) may connect,
        # so another site cannot open a socket with the user's session cookie.
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
