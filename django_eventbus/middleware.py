"""The settings path of the correlation-id middleware (the code is in :mod:`.capture.middleware`).

``MIDDLEWARE = [..., "django_eventbus.middleware.CorrelationIdMiddleware"]`` — the
path settings name, kept stable whatever the package layout.
"""

from .capture.middleware import CorrelationIdMiddleware

__all__ = ["CorrelationIdMiddleware"]
