"""The import path of :class:`EventBusManager` that models and their migrations name.

Migrations record a manager by its import path, so this path stays stable whatever
the package layout (the code is in :mod:`.capture.querysets`).
"""

from .capture.querysets import EventBusManager, EventBusQuerySet

__all__ = ["EventBusManager", "EventBusQuerySet"]
