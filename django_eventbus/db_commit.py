"""The one adapter over Django's on-commit internals (``savepoint_ids``, ``run_on_commit``).

The outbox reuses one publish callback per savepoint level, so that the levels of one
transaction share one ``PUBLISH_BUFFER`` count, and the relay's wake is registered once
per transaction. Django's public API (``transaction.on_commit``) registers callbacks but
cannot list them: :func:`on_commit_state` reads the two attributes, and returns ``None``
when they are missing or changed shape, which its callers take as "register a callback
per call" (the public path). tests/test_outbox.py checks both paths on every Django
version of the matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ["on_commit_state"]


def on_commit_state(
    connection: BaseDatabaseWrapper,
) -> tuple[frozenset[str], Iterator[tuple[frozenset[str], Callable[[], Any]]]] | None:
    """The current savepoint level and the on_commit callbacks still due, newest first.

    Each is a set of savepoint ids: a callback registered at ``ids`` survives
    everything a callback registered now survives when ``ids <= current``.
    Django keeps these in ``connection.savepoint_ids`` and ``connection.run_on_commit``
    (entries ``(savepoint ids, func, robust)``), which are not documented API:
    this is the one place that reads them. ``None`` (a Django without them)
    means: register a callback per call. A ``None`` savepoint id marks an
    ``atomic(savepoint=False)`` block (Django's deletion collector uses one),
    which cannot roll back on its own: it is its parent's level.
    """
    wrapper: Any = connection  # typed loosely: the point is to survive their absence
    current = getattr(wrapper, "savepoint_ids", None)
    pending = getattr(wrapper, "run_on_commit", None)
    if not isinstance(current, list) or not isinstance(pending, list):
        return None
    level = frozenset(current) - {None}
    return level, ((frozenset(entry[0]) - {None}, entry[1]) for entry in reversed(pending))
