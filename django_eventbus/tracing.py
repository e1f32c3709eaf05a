"""OpenTelemetry spans for publishing and handling, with W3C trace context in ``metadata``.

Uses ``opentelemetry-api`` only (no SDK dependency: the application configures its
own SDK and exporter). Without the API installed every function here is a no-op.

* When an event is made inside a traced request, the current trace context is
  written into its ``metadata`` (``traceparent``, and ``tracestate`` when there is
  one), the W3C keys, so any reader can continue the trace.
* Publishing runs in a ``PRODUCER`` span ``publish <topic>``; each consumer's handler
  runs in a ``CONSUMER`` span ``handle <topic>`` whose parent is the context carried
  by the event: the consumer's work is a child of the request that saved the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .events import Event

__all__ = ["handle_span", "inject", "publish_span"]

_api: Any  # (propagate, trace) of opentelemetry-api, or None when it is not installed
try:
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace

    _api = (_propagate, _trace)
except ImportError:  # the API is optional
    _api = None

_TRACE_KEYS = ("traceparent", "tracestate")


def _configured() -> Any:
    """``_api`` once the application set a tracer provider, else None.

    Until then every span would be a no-op, yet creating one and extracting its context
    is a large share of catch-up's time per event (bench/README.md, Listener): skip the work instead.
    """
    if _api is None or isinstance(_api[1].get_tracer_provider(), _api[1].ProxyTracerProvider):
        return None
    return _api


def inject(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """``metadata`` plus the current trace context, or ``metadata`` itself when there is none."""
    api = _configured()
    if api is None or any(key in metadata for key in _TRACE_KEYS):
        return metadata
    carrier: dict[str, str] = {}
    api[0].inject(carrier)
    if not carrier:
        return metadata
    return {**metadata, **{k: v for k, v in carrier.items() if k in _TRACE_KEYS}}


def _attributes(event: Event) -> dict[str, str]:
    return {
        "messaging.system": "django_eventbus",
        "messaging.destination.name": event.topic,
        "messaging.message.id": event.event_id,
    }


@contextlib.contextmanager
def publish_span(events: Sequence[Event]) -> Iterator[None]:
    api = _configured()
    if api is None or not events:
        yield
        return
    propagate, trace = api
    # The loop thread that publishes has no current span: the context travels in the event.
    parent = propagate.extract({k: v for k, v in events[0].metadata.items() if k in _TRACE_KEYS})
    name = f"publish {events[0].topic}" if len(events) == 1 else f"publish {len(events)} events"
    attributes: dict[str, Any] = _attributes(events[0]) if len(events) == 1 else {}
    attributes["messaging.batch.message_count"] = len(events)
    tracer = trace.get_tracer("django_eventbus")
    with tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind.PRODUCER, attributes=attributes
    ):
        yield


@contextlib.contextmanager
def handle_span(consumer: str, event: Event) -> Iterator[None]:
    api = _configured()
    if api is None:
        yield
        return
    propagate, trace = api
    parent = propagate.extract({k: v for k, v in event.metadata.items() if k in _TRACE_KEYS})
    attributes = {**_attributes(event), "messaging.consumer.group.name": consumer}
    with trace.get_tracer("django_eventbus").start_as_current_span(
        f"handle {event.topic}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ):
        yield
