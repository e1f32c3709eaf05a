"""The demo project (and the test settings)."""

from __future__ import annotations

try:  # Celery is optional for the demo: the app is only needed where events go to tasks.
    from .celery import app as celery_app
except ImportError:  # pragma: no cover
    celery_app = None

__all__ = ["celery_app"]
