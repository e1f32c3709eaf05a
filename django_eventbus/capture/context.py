"""The correlation id of the work in progress (a request, a task), carried by a ContextVar.

A ContextVar (not a thread-local) so it follows the request across
``sync_to_async``/``async_to_sync`` hops, which copy the context.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import uuid
from collections.abc import Iterator

__all__ = ["correlation", "current_correlation_id", "new_correlation_id", "set_correlation_id"]

_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "django_eventbus_correlation_id", default=None
)

# What we accept from a client header: printable, no whitespace, bounded (it ends up in logs).
_VALID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,200}$")


def current_correlation_id() -> str | None:
    return _correlation_id.get()


def set_correlation_id(value: str | None) -> contextvars.Token[str | None]:
    return _correlation_id.set(value)


def reset_correlation_id(token: contextvars.Token[str | None]) -> None:
    _correlation_id.reset(token)


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def clean_correlation_id(value: str | None) -> str | None:
    """A header value if it is a sane id, else ``None`` (a fresh id is generated then)."""
    if value and _VALID.match(value.strip()):
        return value.strip()
    return None


@contextlib.contextmanager
def correlation(correlation_id: str | None = None) -> Iterator[str]:
    """Every event emitted inside the block carries ``correlation_id`` (a new one if omitted)."""
    value = correlation_id or new_correlation_id()
    token = _correlation_id.set(value)
    try:
        yield value
    finally:
        _correlation_id.reset(token)
