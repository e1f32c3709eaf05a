"""Hands the correlation id and source to the capture triggers (``CAPTURE = "database"``).

The triggers read ``current_setting('eventbus.correlation_id', true)`` and
``eventbus.source``. While a correlation id is set (the middleware,
:func:`django_eventbus.correlation`), every statement Django sends on a
PostgreSQL connection is prefixed with
``SELECT set_config('eventbus.correlation_id', …, true), set_config('eventbus.source', …, true);``
— django-pghistory's technique, through Django's execute-wrapper hook.

Why this mechanism:

- Transaction-local (``set_config(…, true)``) and in the same query string as
  the write, so it is right in both modes: in autocommit the two statements of
  one simple query run in one implicit transaction, so the setting reaches the
  write and is gone after it; inside ``atomic()`` it lasts to the end of the
  transaction and a rolled back savepoint takes it back. A session-level setting
  would outlive the block on a pooled or persistent connection.
- No extra round trip, and nothing at all is added while no correlation id is set.
- The wrapper is on every PostgreSQL connection (added on ``connection_created``)
  and reads the ContextVar when the statement runs, so it follows the id across
  ``sync_to_async``/``async_to_sync`` hops to another thread's connection. Django's
  ``execute_wrapper()`` context manager installs a wrapper for a block on one
  thread's connection only, so we append the same kind of wrapper to the
  connection's ``execute_wrappers`` for its lifetime instead.
- When the id is cleared inside a transaction that still carries it, the next
  statement resets it (``''``, which the trigger reads as NULL).

Limits (documented in docs/models.md): multi-statement strings need psycopg's
client-side binding (Django's default); with ``OPTIONS["server_side_binding"]``
and for ``executemany()`` nothing is prefixed, so those writes carry no id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from django_eventbus.conf import conf

from .context import current_correlation_id

__all__ = ["ContextInjector", "install_on_connection"]

RESET = "SELECT set_config('eventbus.correlation_id', '', true), set_config('eventbus.source', '', true); "


def _literal(value: str) -> str:
    # Standard-conforming string literal; NUL cannot travel in a PostgreSQL string.
    return "'" + value.replace("\x00", "").replace("'", "''") + "'"


class ContextInjector:
    """The execute wrapper of one connection (see the module docstring)."""

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        self.sent = False  # whether a transaction of this connection may still carry an id
        # Imported here: only PostgreSQL connections get a wrapper, and they have a driver.
        from django.db.backends.postgresql.psycopg_any import is_psycopg3

        self.next_result = is_psycopg3

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        value = current_correlation_id()
        # Cheapest tests first: this runs for every query of every PostgreSQL connection.
        if many or (value is None and not self.sent) or conf.CAPTURE != "database":
            return execute(sql, params, many, context)
        if getattr(context["cursor"].cursor, "name", None):
            # A server-side cursor (QuerySet.iterator()) wraps its query in DECLARE, which takes
            # one statement; it only reads.
            return execute(sql, params, many, context)
        if value is None:
            self.sent = False
            if not self.connection.in_atomic_block:
                return execute(sql, params, many, context)  # autocommit: it ended with its statement
            prefix = RESET
        else:
            self.sent = True
            prefix = (
                f"SELECT set_config('eventbus.correlation_id', {_literal(value)}, true), "
                f"set_config('eventbus.source', {_literal(conf.SOURCE)}, true); "
            )
            if params is not None:
                prefix = prefix.replace("%", "%%")  # the driver reads %-placeholders when params are given
        result = execute(prefix + sql, params, many, context)
        if self.next_result:
            # psycopg 3 leaves the cursor on the first result (ours): move to the statement's own,
            # so fetches, rowcount and RETURNING read what the caller asked for.
            context["cursor"].nextset()
        return result


def install_on_connection(connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """``connection_created`` receiver: add the wrapper once per PostgreSQL connection object."""
    if connection.vendor != "postgresql":
        return
    options = connection.settings_dict.get("OPTIONS") or {}
    if options.get("server_side_binding"):
        return  # one statement per query there: see the module docstring
    if not any(isinstance(w, ContextInjector) for w in connection.execute_wrappers):
        connection.execute_wrappers.append(ContextInjector(connection))
