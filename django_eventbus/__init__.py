"""django-eventbus: committed model changes as events, delivered everywhere they are needed."""

from __future__ import annotations

__version__ = "0.1.0"
