"""Prometheus metrics of the event bus (extra ``[prometheus]``: ``prometheus-client``).

Importing this module registers, in ``prometheus_client``'s default registry:

==================================  =========  ==================================================
``eventbus_published_total``        counter    events this process published; ``topic``
``eventbus_delivered_total``        counter    handler calls that returned; ``consumer``, ``topic``
``eventbus_failed_total``           counter    handler calls that raised; ``consumer``, ``topic``
``eventbus_dead_lettered_total``    counter    events given up after retries; ``consumer``, ``topic``
``eventbus_publish_seconds``        histogram  time to hand events to the transport
``eventbus_handle_seconds``         histogram  handler run time; ``consumer``
``eventbus_consumer_lag_events``    gauge      log rows after a durable consumer's cursor
``eventbus_consumer_lag_seconds``   gauge      age of the oldest of those rows (0: caught up)
``eventbus_bus_connected``          gauge      1 while a bus of this process is connected
``eventbus_process_<name>_total``   counter    the counters of ``metrics.get_stats()``
==================================  =========  ==================================================

The lag gauges have a ``consumer`` label, the connection gauge a ``backend`` label.

Serve them with :func:`metrics_view` (``path("metrics", metrics_view)``) in the web
processes; ``eventbus_listen --metrics-port 9100`` serves them from a listener.
The lag gauges read the cursors and the log at scrape time (two indexed queries);
one scrape of one process is enough for them, they are the same everywhere.

With several worker processes (gunicorn, uwsgi) use prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): the counters and histograms are
then summed across workers by ``MultiProcessCollector``; the gauges of the custom
collector are read per scrape as above.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from django.http import HttpRequest, HttpResponse
from prometheus_client import REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from django_eventbus import signals
from django_eventbus.events import Event

from . import STAT_DESCRIPTIONS, _buses, get_stats

__all__ = ["metrics_view"]

PUBLISHED = Counter("eventbus_published", "Events published by this process.", ["topic"])
DELIVERED = Counter("eventbus_delivered", "Consumer handler calls that returned.", ["consumer", "topic"])
FAILED = Counter("eventbus_failed", "Consumer handler calls that raised.", ["consumer", "topic"])
DEAD_LETTERED = Counter(
    "eventbus_dead_lettered", "Events a consumer gave up on after its retries.", ["consumer", "topic"]
)
PUBLISH_SECONDS = Histogram("eventbus_publish_seconds", "Time to hand events to the transport.")
HANDLE_SECONDS = Histogram("eventbus_handle_seconds", "Consumer handler run time.", ["consumer"])


def _on_published(events: Sequence[Event], seconds: float, **kwargs: Any) -> None:
    PUBLISH_SECONDS.observe(seconds)
    for event in events:
        PUBLISHED.labels(event.topic).inc()


def _on_handled(consumer: str, event: Event, seconds: float, **kwargs: Any) -> None:
    DELIVERED.labels(consumer, event.topic).inc()
    HANDLE_SECONDS.labels(consumer).observe(seconds)


def _on_failed(consumer: str, event: Event, dead_lettered: bool, **kwargs: Any) -> None:
    FAILED.labels(consumer, event.topic).inc()
    if dead_lettered:
        DEAD_LETTERED.labels(consumer, event.topic).inc()


signals.event_published.connect(_on_published, dispatch_uid="django_eventbus.prometheus")
signals.event_handled.connect(_on_handled, dispatch_uid="django_eventbus.prometheus")
signals.event_failed.connect(_on_failed, dispatch_uid="django_eventbus.prometheus")


def consumer_lag() -> dict[str, tuple[int, float]]:
    """Durable consumer name -> (log rows after its cursor, age in seconds of the oldest)."""
    from django_eventbus.models import ConsumerCursor, StoredEvent

    head = StoredEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
    now = datetime.now(timezone.utc)
    lag: dict[str, tuple[int, float]] = {}
    for name, position in ConsumerCursor.objects.values_list("name", "position"):
        if position >= head:
            lag[name] = (0, 0.0)
            continue
        oldest = (
            StoredEvent.objects.filter(id__gt=position).order_by("id").values_list("timestamp", flat=True)
        ).first()
        count = StoredEvent.objects.filter(id__gt=position, id__lte=head).count()
        lag[name] = (count, max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
    return lag


class _EventBusCollector(Collector):
    def describe(self) -> Iterator[Any]:
        # Registration asks for the names; without this it would collect (query the database).
        yield GaugeMetricFamily("eventbus_consumer_lag_events", "", labels=["consumer"])
        yield GaugeMetricFamily("eventbus_consumer_lag_seconds", "", labels=["consumer"])
        yield GaugeMetricFamily("eventbus_bus_connected", "", labels=["backend"])
        for name in STAT_DESCRIPTIONS:
            yield CounterMetricFamily(f"eventbus_process_{name}", "")

    def collect(self) -> Iterator[Any]:
        events = GaugeMetricFamily(
            "eventbus_consumer_lag_events", "Log rows after a durable consumer's cursor.", labels=["consumer"]
        )
        seconds = GaugeMetricFamily(
            "eventbus_consumer_lag_seconds",
            "Age of the oldest log row a durable consumer has not passed (0 when caught up).",
            labels=["consumer"],
        )
        for name, (count, age) in sorted(consumer_lag().items()):
            events.add_metric([name], count)
            seconds.add_metric([name], age)
        yield events
        yield seconds
        connected = GaugeMetricFamily(
            "eventbus_bus_connected", "1 while a bus of this process is connected.", labels=["backend"]
        )
        for bus in _buses():
            connected.add_metric([bus.backend_name], 1.0 if bus.connected else 0.0)
        yield connected
        stats = get_stats()
        for name, help_text in STAT_DESCRIPTIONS.items():
            yield CounterMetricFamily(f"eventbus_process_{name}", help_text, value=stats[name])


_COLLECTOR = _EventBusCollector()
REGISTRY.register(_COLLECTOR)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The Prometheus text exposition of the default registry (protect it like any internal URL)."""
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
