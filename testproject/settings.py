"""Settings of the demo project, which are also the test settings.

The bus comes from ``EVENTBUS_URL`` (default ``memory://``) and the database
from ``DATABASE_URL`` (default SQLite), so the same project runs the demo on
the embedded default and the test suite against the real servers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-demo-only-do-not-deploy")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]


def database_from_url(url: str) -> dict[str, Any]:
    """A tiny DATABASE_URL parser (sqlite:///path, postgres://user:pass@host:port/name)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        name = unquote(parts.path[1:]) if parts.path not in ("", "/") else str(BASE_DIR / "db.sqlite3")
        # A file (not :memory:) test database, so a live server in another process sees it.
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": name,
            # DATABASE_TEST_NAME: another file, for test runs side by side in one checkout.
            "TEST": {"NAME": os.environ.get("DATABASE_TEST_NAME", str(BASE_DIR / "test-db.sqlite3"))},
            # Several processes write this file (the web server, eventbus_listen's cursor and
            # lease writes): a transaction that reads first and writes later would fail with
            # "database is locked" instead of waiting. IMMEDIATE takes the write lock at BEGIN,
            # where the busy timeout applies (Django >= 5.1; docs/deployment.md).
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
        }
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path[1:]) or "postgres",
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "TEST": {"NAME": os.environ.get("DATABASE_TEST_NAME", "test_eventbus")},
        }
    raise ValueError(f"unsupported DATABASE_URL scheme: {url!r}")


DATABASES = {"default": database_from_url(os.environ.get("DATABASE_URL", "sqlite:///"))}
DATABASES["default"]["ATOMIC_REQUESTS"] = True
if os.environ.get("DATABASE_POOL") and DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # Django's psycopg pool (Django >= 5.1, psycopg[pool]): DATABASE_POOL=<max connections>
    # per process. docs/deployment.md explains when the ASGI server and the listener want it.
    DATABASES["default"]["OPTIONS"] = {
        "pool": {"min_size": 1, "max_size": int(os.environ["DATABASE_POOL"]), "timeout": 30},
    }
if os.environ.get("DATABASE_APPLICATION_NAME"):  # tests tell the processes' connections apart
    options = DATABASES["default"].setdefault("OPTIONS", {})
    options["application_name"] = os.environ["DATABASE_APPLICATION_NAME"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_eventbus",
    "testproject.inventory",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_eventbus.middleware.CorrelationIdMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "testproject.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "testproject" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
WSGI_APPLICATION = "testproject.wsgi.application"
ASGI_APPLICATION = "testproject.asgi.application"

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
USE_TZ = True
TIME_ZONE = "UTC"


def bus_from_env() -> Any:
    """EVENTBUS_URL (default memory://), with EVENTBUS_CHANNEL_PREFIX if set.

    ``postgres://`` alone means: PostgreSQL LISTEN/NOTIFY on Django's own database.
    """
    from django_eventbus.events.bus import parse_bus_url

    url = os.environ.get("EVENTBUS_URL", "memory://")
    prefix = os.environ.get("EVENTBUS_CHANNEL_PREFIX")
    return {**parse_bus_url(url), "channel_prefix": prefix} if prefix else url


EVENTBUS: dict[str, Any] = {
    "BUS": bus_from_env(),
    "CATCHUP_INTERVAL": float(os.environ.get("EVENTBUS_CATCHUP_INTERVAL", "2.0")),
    # The library's default is "auto" (database capture on PostgreSQL). The suite names the
    # mode: signal capture here, database capture where tests/test_database_capture.py asks.
    "CAPTURE": os.environ.get("EVENTBUS_CAPTURE", "signals"),
    "LEASE_TTL": float(os.environ.get("EVENTBUS_LEASE_TTL", "5.0")),
    "MODELS": {
        "inventory.Product": {},
        "inventory.Order": {},
        "inventory.Shipment": {"exclude": ["secret"]},
    },
}
if os.environ.get("EVENTBUS_WEBSOCKET_MAX_CONNECTIONS"):
    # bench/bench_websocket.py opens its thousand sockets as one user from one address.
    EVENTBUS["WEBSOCKET_MAX_CONNECTIONS_PER_USER"] = int(os.environ["EVENTBUS_WEBSOCKET_MAX_CONNECTIONS"])
    EVENTBUS["WEBSOCKET_MAX_CONNECTIONS_PER_ADDRESS"] = int(os.environ["EVENTBUS_WEBSOCKET_MAX_CONNECTIONS"])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_eventbus": {"handlers": ["console"], "level": os.environ.get("EVENTBUS_LOG", "INFO")}
    },
}

# Celery (the testproject routes events to a task in the tests; broker: the local Redis).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/2")
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True


def channel_layers_from_env() -> dict[str, Any]:
    """The Channels layer: in memory by default, channels-redis when ``CHANNEL_LAYER_URL`` is set.

    ``CHANNEL_LAYER_URL=redis://host:port/db`` selects ``RedisPubSubChannelLayer``
    (recommended, see docs/channels.md); ``CHANNEL_LAYER_BACKEND=core`` selects
    ``RedisChannelLayer`` instead. ``CHANNEL_LAYER_PREFIX`` (default ``asgi``) keeps
    separate projects (or test runs) sharing one Redis apart.
    """
    url = os.environ.get("CHANNEL_LAYER_URL")
    if not url:
        # One process, one server loop: the demo on the memory bus. Capacity above the
        # default 100, which drops messages to a consumer in a burst without a word.
        return {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 1000}}}
    prefix = os.environ.get("CHANNEL_LAYER_PREFIX", "asgi")
    if os.environ.get("CHANNEL_LAYER_BACKEND", "pubsub") == "core":
        # redis-py 8 defaults to socket_timeout=5 s and 100 connections a pool. RedisChannelLayer
        # blocks 5 s in BZPOPMIN, so an idle consumer's read times out and the consumer dies;
        # and 500 sockets closing at once exceed 100 connections. Hence both options.
        host = {"address": url, "socket_timeout": 10, "max_connections": 10_000}
        config: dict[str, Any] = {"hosts": [host], "prefix": prefix, "capacity": 1000}
        return {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": config}}
    return {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [url], "prefix": prefix},
        }
    }


CHANNEL_LAYERS = channel_layers_from_env()
