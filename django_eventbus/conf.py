"""The ``EVENTBUS`` setting, read live on every access.

Reading ``settings.EVENTBUS`` each time (rather than caching it at import) is
what makes ``override_settings`` and pytest-django's ``settings`` fixture work.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from django.conf import settings

__all__ = ["DEFAULTS", "conf"]

DEFAULTS: dict[str, Any] = {
    "BUS": {"backend": "memory"},
    "MODELS": {},
    "EXCLUDE_FIELDS": ["password"],
    "STORE_EVENTS": True,
    "RETENTION": 7 * 24 * 3600,
    "SOURCE": None,
    "DATABASE_ALIAS": "default",
    "EMIT_RAW": False,
    # "database" (PostgreSQL triggers), "signals" (model signals, any database), or "auto":
    # database capture on PostgreSQL with STORE_EVENTS on, signals elsewhere (docs/models.md).
    "CAPTURE": "auto",
    "CONSUMERS_MODULE": "event_consumers",
    "PUBLISH_TIMEOUT": 10.0,
    "CATCHUP_INTERVAL": 2.0,
    "GAP_TIMEOUT": 30.0,
    # Seconds a durable consumer's owner may go without renewing before a standby takes
    # over (docs/consumers.md); renewed every LEASE_TTL / 3.
    "LEASE_TTL": 5.0,
    # At most this many partitions of one partitioned consumer per listener process; None:
    # a fair share, ceil(partitions / listeners running it) (docs/consumers.md).
    "PARTITIONS_PER_LISTENER": None,
    # Events one transaction keeps in memory for publishing after commit; the rest
    # are published by the relay from the log (docs/guarantees.md).
    "PUBLISH_BUFFER": 10_000,
    # Seconds between the relay's polls of the log (it is also woken after commit).
    "RELAY_INTERVAL": 0.2,
    "CELERY_ROUTES": {},
    # The stream engine the log is relayed to (docs/streams.md), e.g. "redis-streams://…".
    "STREAMS": None,
    # Seconds before a stream consumer group member counts as dead (docs/streams.md).
    "STREAM_CLAIM_IDLE": 30.0,
    # The admin's "Follow live" websocket (docs/operations.md); None hides the toggle.
    "ADMIN_WEBSOCKET_URL": "/ws/events/",
    # Channels and the websocket consumer (docs/channels.md).
    "CHANNELS": True,
    # How far behind the forwarder may resume before it skips to the end of the log
    # (events, seconds; None: no limit). docs/channels.md.
    "CHANNELS_RESUME_LIMIT": 10_000,
    "CHANNELS_RESUME_MAX_AGE": 300.0,
    "WEBSOCKET_AUTHORIZE": "django_eventbus.channels.auth.default_authorize",
    "WEBSOCKET_MAX_SUBSCRIPTIONS": 32,
    "WEBSOCKET_MAX_TOPIC_LENGTH": 200,
    "WEBSOCKET_MAX_FRAME_BYTES": 4096,
    "WEBSOCKET_REPLAY_LIMIT": 1000,
    # Limits against abuse and revoked access (docs/channels.md, SECURITY.md).
    "WEBSOCKET_REPLAY_SCAN_LIMIT": 10_000,
    "WEBSOCKET_REAUTHORIZE_SECONDS": 60,
    "WEBSOCKET_MAX_CONNECTIONS_PER_USER": 20,
    "WEBSOCKET_MAX_CONNECTIONS_PER_ADDRESS": 100,
    "WEBSOCKET_SUBSCRIBE_RATE": 10,
}

MODEL_DEFAULTS: dict[str, Any] = {
    "topic": None,
    "fields": None,
    "exclude": [],
    "events": ["created", "updated", "deleted"],
    "track_changes": True,
    "skip_unchanged": False,
}


class EventBusSettings:
    """Typed access to ``settings.EVENTBUS`` with defaults; see the README for each key."""

    def __init__(self) -> None:
        # (BUS as last seen, its parsed config): parsing a URL on every commit showed
        # in the tracked-save profile. Compared by value, so a replaced or edited BUS
        # setting is parsed again.
        self._bus_cache: tuple[Any, dict[str, Any]] | None = None
        self._default_source: tuple[int, str] | None = None

    @property
    def declared(self) -> object:
        """``settings.EVENTBUS`` as written, of any type (``{}`` when unset): for the checks."""
        return getattr(settings, "EVENTBUS", {})

    @property
    def raw(self) -> Mapping[str, Any]:
        value = self.declared
        return value if isinstance(value, Mapping) else {}

    def get(self, key: str) -> Any:
        return self.raw.get(key, DEFAULTS[key])

    @property
    def BUS(self) -> Mapping[str, Any] | str:
        return self.get("BUS")  # type: ignore[no-any-return]

    @property
    def MODELS(self) -> Mapping[str, Mapping[str, Any]]:
        return self.get("MODELS")  # type: ignore[no-any-return]

    @property
    def EXCLUDE_FIELDS(self) -> list[str]:
        return list(self.get("EXCLUDE_FIELDS"))

    @property
    def STORE_EVENTS(self) -> bool:
        return bool(self.get("STORE_EVENTS"))

    @property
    def RETENTION(self) -> int:
        return int(self.get("RETENTION"))

    @property
    def SOURCE(self) -> str:
        value = self.get("SOURCE")
        if value:
            return str(value)
        # host:pid names the process that published, which is what an operator needs to find it.
        pid = os.getpid()
        if self._default_source is None or self._default_source[0] != pid:  # new, or a forked child
            self._default_source = (pid, f"{socket.gethostname()}:{pid}")
        return self._default_source[1]

    @property
    def DATABASE_ALIAS(self) -> str:
        return str(self.get("DATABASE_ALIAS"))

    @property
    def EMIT_RAW(self) -> bool:
        return bool(self.get("EMIT_RAW"))

    @property
    def CAPTURE(self) -> str:
        """The capture mode in force: ``"signals"`` or ``"database"`` (``"auto"`` resolved).

        Database capture was measured at least as fast as signal capture for single
        saves (bench/README.md), and it captures every writer: the default on PostgreSQL.
        It needs the event log, so ``STORE_EVENTS = False`` means signal capture.
        """
        value = self.get("CAPTURE")
        if value != "auto":
            return str(value)
        if not self.STORE_EVENTS:
            return "signals"
        from django.db import connections

        alias = self.DATABASE_ALIAS
        if alias in connections.settings and connections[alias].vendor == "postgresql":
            return "database"
        return "signals"

    @property
    def CONSUMERS_MODULE(self) -> str:
        return str(self.get("CONSUMERS_MODULE"))

    @property
    def PUBLISH_TIMEOUT(self) -> float:
        return float(self.get("PUBLISH_TIMEOUT"))

    @property
    def PUBLISH_BUFFER(self) -> int:
        return int(self.get("PUBLISH_BUFFER"))

    @property
    def RELAY_INTERVAL(self) -> float:
        return float(self.get("RELAY_INTERVAL"))

    @property
    def GAP_TIMEOUT(self) -> float:
        return float(self.get("GAP_TIMEOUT"))

    @property
    def LEASE_TTL(self) -> float:
        return float(self.get("LEASE_TTL"))

    @property
    def PARTITIONS_PER_LISTENER(self) -> int | None:
        value = self.get("PARTITIONS_PER_LISTENER")
        return None if value is None else int(value)

    @property
    def ADMIN_WEBSOCKET_URL(self) -> str | None:
        value = self.get("ADMIN_WEBSOCKET_URL")
        return str(value) if value else None

    def raw_bus_config(self) -> dict[str, Any]:
        """The ``BUS`` setting as a ``create_event_bus`` config dict, as written."""
        from .events.bus import parse_bus_url

        bus = self.BUS
        cached = self._bus_cache
        if cached is None or cached[0] != bus:
            parsed = parse_bus_url(bus) if isinstance(bus, str) else dict(bus)
            cached = self._bus_cache = (bus if isinstance(bus, str) else dict(bus), parsed)
        return dict(cached[1])

    def uses_django_database(self) -> bool:
        """True for the PostgreSQL bus without ``connection_string``: Django's database is the transport."""
        config = self.raw_bus_config()
        return config.get("backend") == "postgres" and not config.get("connection_string")

    def bus_config(self) -> dict[str, Any]:
        """The config the process's bus is built from (Django's database filled in if needed)."""
        config = self.raw_bus_config()
        if self.uses_django_database():
            config["connection_string"] = django_database_conninfo(self.DATABASE_ALIAS)
        return config


def django_database_conninfo(alias: str) -> str:
    """A libpq conninfo string for a Django PostgreSQL database alias."""
    from django.db import connections
    from psycopg.conninfo import make_conninfo

    params = connections[alias].get_connection_params()
    keys = {"dbname", "user", "password", "host", "port", "sslmode", "sslrootcert", "sslcert", "sslkey"}
    return make_conninfo(**{k: v for k, v in params.items() if k in keys and v not in (None, "")})


conf = EventBusSettings()
