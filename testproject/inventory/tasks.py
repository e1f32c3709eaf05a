"""Celery tasks that events are routed to (EVENTBUS["CELERY_ROUTES"] or celery_route())."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import shared_task

from django_eventbus.events import Event


@shared_task(bind=True, max_retries=3, default_retry_delay=0.2)  # type: ignore[untyped-decorator]
def record_event(self: Any, event_data: dict[str, Any]) -> str:
    """Push the event's id to a Redis list (what the tests and the demo look at)."""
    event = Event.from_dict(event_data)
    client = redis.Redis.from_url(os.environ.get("EVENTBUS_TASK_RESULTS_URL", "redis://127.0.0.1:6379/2"))
    try:
        client.rpush(os.environ.get("EVENTBUS_TASK_RESULTS_KEY", "eventbus:task-results"), event.event_id)
    finally:
        client.close()
    return event.event_id
