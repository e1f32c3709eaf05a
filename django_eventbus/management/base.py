"""The base of the app's management commands: an outage or bad input is one line, never a traceback.

Django prints a :class:`~django.core.management.CommandError` as one line and exits
with status 1 (``--traceback`` still shows the stack). The commands raise it for
bad arguments themselves; :class:`EventbusCommand` turns what they meet at run time
-- a database or bus that is down, a refused connection, a timeout -- into one too.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from django_eventbus.events.bus import mask_secret
from django_eventbus.events.errors import EventBusError

__all__ = ["EventbusCommand", "one_line"]

# Driver errors that are not Django's DatabaseError: a bus with its own connection
# (postgres:// with a connection string, redis://) raises its client's errors.
_DRIVER_MODULES = ("psycopg", "redis")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, passwords in URLs masked."""
    lines = str(exc).strip().splitlines()
    text = mask_secret(lines[0]) if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, (DatabaseError, EventBusError, ConnectionError, TimeoutError, OSError)):
        return True
    return type(exc).__module__.split(".")[0] in _DRIVER_MODULES


class EventbusCommand(BaseCommand):
    """A command whose failures at run time are one-line :class:`CommandError`\\ s."""

    def execute(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute(*args, **options)
        except CommandError:
            raise
        except Exception as exc:
            if not _is_outage(exc):
                raise  # a bug: the traceback is what a report needs
            raise CommandError(one_line(exc)) from exc
