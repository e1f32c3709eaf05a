"""The :class:`EventBus` protocol and :func:`create_event_bus`, the backend factory."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import BackendNotInstalledError
from .types import Event, Handler, Subscription

__all__ = ["BACKENDS", "EventBus", "create_event_bus", "mask_secret", "parse_bus_url", "resolve_backend"]


@runtime_checkable
class EventBus(Protocol):
    """What every backend offers (the guide's API)."""

    async def connect(self) -> None:
        """Connect to the event bus."""

    async def close(self) -> None:
        """Close the connection."""

    async def publish(self, topic: str, event: Event) -> None:
        """Publish an event to a topic."""

    async def subscribe(self, topic: str, handler: Handler, pattern: str | None = None) -> Subscription:
        """Subscribe to events on a topic, or on every topic matching ``pattern`` (fnmatch)."""


#: backend name -> (dotted class path, the client package it needs, the pip extra that installs it)
BACKENDS: dict[str, tuple[str, str | None, str | None]] = {
    "memory": ("django_eventbus.events.memory.InMemoryEventBus", None, None),
    "postgres": ("django_eventbus.events.postgres.PostgresEventBus", "psycopg", "postgres"),
    "redis": ("django_eventbus.events.redis.RedisEventBus", "redis", "redis"),
}

_URL_SCHEMES = {
    "memory": "memory",
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
    "redis+sentinel": "redis",
    "postgres": "postgres",
    "postgresql": "postgres",
}


def mask_secret(target: str) -> str:
    """Hide the password of a URL (``scheme://user:***@host``) or libpq conninfo (``password=***``)."""
    if "://" in target:
        parts = urlsplit(target)
        # From the netloc text, not parts.port: a malformed port must not turn into a traceback.
        userinfo, at, hostport = parts.netloc.rpartition("@")
        if at and ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
            return urlunsplit(parts._replace(netloc=netloc))
        return target
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", target)


# Schemes other libraries use for Redis Cluster: refused with a reason, not as "unknown".
_CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster", "cluster"})


def parse_bus_url(url: str) -> dict[str, Any]:
    """A bus URL -> a config dict: ``memory://``, ``redis(s)://…``, ``redis+sentinel://…``, ``postgres(ql)://…``.

    A PostgreSQL URL may carry ``?listen_url=<url-encoded URL>``: the connection the bus
    LISTENs on (``listen_connection_string``), e.g. PostgreSQL itself while the rest goes
    through PgBouncer. ``postgres://?listen_url=…`` keeps Django's database for the rest.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in _CLUSTER_SCHEMES:
        raise ValueError(
            f"Redis Cluster ({scheme}://) is not supported by the redis event bus: it does not "
            "follow cluster topology or use sharded pub/sub. Use redis+sentinel:// for high "
            "availability, or a redis:// URL of one node (see docs/core.md, Redis Cluster)"
        )
    backend = _URL_SCHEMES.get(scheme)
    if backend is None:
        raise ValueError(
            f"unknown event bus URL scheme {scheme!r} in {mask_secret(url)!r}; use one of "
            + ", ".join(f"{s}://" for s in _URL_SCHEMES)
        )
    if backend == "memory":
        return {"backend": "memory"}
    if backend == "redis":
        return {"backend": "redis", "url": url}
    config: dict[str, Any] = {"backend": "postgres"}
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    listen = [value for key, value in query if key == "listen_url"]
    if listen:
        config["listen_connection_string"] = listen[-1]
        rest = urlencode([(key, value) for key, value in query if key != "listen_url"])
        url = urlunsplit(parts._replace(query=rest))
    if url.rstrip("/").lower() not in ("postgres:", "postgresql:"):
        # Bare "postgres://" has no connection string: the Django layer uses its own database.
        config["connection_string"] = url
    return config


def resolve_backend(name: str) -> type[Any]:
    """Import the class of a backend name or dotted path, with errors that say how to fix them."""
    if name in BACKENDS:
        path, package, extra = BACKENDS[name]
        if package is not None:
            try:
                importlib.import_module(package)
            except ImportError as exc:
                raise BackendNotInstalledError(
                    f"the {name!r} event bus backend needs the {package!r} package: "
                    f"pip install 'django-eventbus[{extra}]'"
                ) from exc
    elif "." in name:
        path = name
    else:
        raise ValueError(
            f"unknown event bus backend {name!r}; valid backends are "
            + ", ".join(repr(b) for b in BACKENDS)
            + " or the dotted path of a class"
        )
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        cls: type[Any] = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import event bus backend {path!r}: {exc}") from exc
    return cls


def create_event_bus(config: Mapping[str, Any] | str | None = None) -> EventBus:
    """Create an event bus from a config dict (``{"backend": "memory", ...}``) or a URL.

    Every key but ``backend`` is passed to the backend's constructor. Backends are
    imported only here, so a missing client library fails only for its backend.
    No config, or one without ``backend``, is the in-memory bus (as in the seed library).
    """
    if config is None:
        config = {}
    if isinstance(config, str):
        config = parse_bus_url(config)
    if not isinstance(config, Mapping):
        raise ValueError('event bus config must be a URL or a dict with a "backend" key')
    options = dict(config)
    name = options.pop("backend", "memory")
    cls = resolve_backend(str(name))
    try:
        bus = cls(**options)
    except TypeError as exc:
        raise ValueError(f"invalid options for the {name!r} event bus backend: {exc}") from exc
    return bus  # type: ignore[no-any-return]
