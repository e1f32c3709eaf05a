"""Exceptions raised by the bus; each says what to do about it."""

from __future__ import annotations

__all__ = ["BackendNotInstalledError", "BusClosedError", "EventBusError", "EventSerializationError"]


class EventBusError(Exception):
    """Base class of every error the bus raises on purpose."""


class EventSerializationError(EventBusError, TypeError, ValueError):
    """The event cannot travel as JSON. Raised by ``publish`` before anything is sent.

    A ``TypeError`` (like ``json.dumps``) and a ``ValueError``, so either ``except`` works.
    """


class BusClosedError(EventBusError, RuntimeError):
    """The bus is not connected: ``await bus.connect()`` first, or it was closed."""


class BackendNotInstalledError(EventBusError, ImportError):
    """The backend's client library is missing; the message names the extra to install."""
