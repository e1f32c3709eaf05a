"""What operators hook in: the app's Django signals, Prometheus metrics, OpenTelemetry spans."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from django.test import RequestFactory
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from django_eventbus import signals
from django_eventbus.capture.publishing import make_event, publish
from django_eventbus.delivery.consumers import Consumer
from django_eventbus.delivery.listener import Listener
from django_eventbus.events import BaseEventBus, Event, EventType, create_event_bus
from django_eventbus.metrics.prometheus import metrics_view
from django_eventbus.models import ConsumerCursor, StoredEvent
from tests.orm import orm

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    # A private provider for this test only: the global one can be set once per process,
    # and a recording provider left behind would put trace context into every later event.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer", provider.get_tracer)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    yield exporter
    provider.shutdown()


@pytest.fixture
def received() -> Iterator[dict[str, list[dict[str, Any]]]]:
    got: dict[str, list[dict[str, Any]]] = {"published": [], "handled": [], "failed": []}

    def recorder(kind: str) -> Callable[..., None]:
        return lambda sender, **kw: got[kind].append(kw)

    receivers = {kind: recorder(kind) for kind in got}
    signals.event_published.connect(receivers["published"], weak=False)
    signals.event_handled.connect(receivers["handled"], weak=False)
    signals.event_failed.connect(receivers["failed"], weak=False)
    yield got
    signals.event_published.disconnect(receivers["published"])
    signals.event_handled.disconnect(receivers["handled"])
    signals.event_failed.disconnect(receivers["failed"])


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.02)


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def run_consumers(consumers: list[Consumer], events: list[Event], done: Callable[[], bool]) -> None:
    bus = cast(BaseEventBus, create_event_bus({"backend": "memory"}))
    await bus.connect()
    listener = Listener(bus, consumers, interval=0.2)
    await listener.start()
    try:
        for event in events:
            await bus.publish(event.topic, event)
        await until(done, "the consumers to finish")
    finally:
        await listener.stop()
        await bus.close()


async def test_signals_and_prometheus_count_handled_failed_and_dead_lettered(
    received: dict[str, list[dict[str, Any]]],
) -> None:
    name = f"obs.{uuid.uuid4().hex[:8]}"
    ok: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("no")

    good = Consumer(name=f"{name}.good", pattern="obs:*", func=lambda e: ok.append(e.event_id), durable=False)
    bad = Consumer(
        name=f"{name}.bad", pattern="obs:*", func=broken, durable=False, retries=1, retry_delay=0.01
    )
    events = [Event(type=EventType.CREATED, topic="obs:a", payload={"i": i}) for i in range(3)]
    await run_consumers(
        [good, bad],
        events,
        lambda: len(ok) == 3 and len([f for f in received["failed"] if f["dead_lettered"]]) == 3,
    )

    assert [(h["consumer"], h["event"].event_id) for h in received["handled"]] == [
        (good.name, e.event_id) for e in events
    ]
    assert all(h["seconds"] >= 0 for h in received["handled"])
    failed = [(f["consumer"], f["attempts"], f["dead_lettered"]) for f in received["failed"]]
    assert failed == [(bad.name, 1, False), (bad.name, 2, True)] * 3
    assert isinstance(received["failed"][0]["error"], RuntimeError)

    assert sample("eventbus_delivered_total", consumer=good.name, topic="obs:a") == 3
    assert sample("eventbus_failed_total", consumer=bad.name, topic="obs:a") == 6
    assert sample("eventbus_dead_lettered_total", consumer=bad.name, topic="obs:a") == 3
    assert sample("eventbus_handle_seconds_count", consumer=good.name) == 3


async def test_a_receiver_that_raises_breaks_nothing(received: dict[str, list[dict[str, Any]]]) -> None:
    def explode(sender: Any, **kwargs: Any) -> None:
        raise ValueError("receiver bug")

    signals.event_handled.connect(explode, weak=False)
    try:
        seen: list[Event] = []
        consumer = Consumer(
            name=f"obs.{uuid.uuid4().hex[:8]}", pattern="obs:*", func=seen.append, durable=False
        )
        await run_consumers(
            [consumer], [Event(type=EventType.CREATED, topic="obs:b")], lambda: len(seen) == 1
        )
    finally:
        signals.event_handled.disconnect(explode)
    assert len(received["handled"]) == 1 and received["failed"] == []


def test_published_events_are_signalled_and_counted(received: dict[str, list[dict[str, Any]]]) -> None:
    from django_eventbus.capture.outbox import flush_pending

    topic = f"obs:{uuid.uuid4().hex[:8]}"
    before = sample("eventbus_published_total", topic=topic) or 0
    publish(topic, make_event(topic, payload={"n": 1}))
    flush_pending()
    assert [
        [e.topic for e in p["events"]] for p in received["published"] if p["events"][0].topic == topic
    ] == [[topic]]
    assert sample("eventbus_published_total", topic=topic) == before + 1


def test_metrics_view_shows_consumer_lag_in_events_and_seconds() -> None:
    name = f"obs.lag.{uuid.uuid4().hex[:8]}"
    publish("obs:lag", make_event("obs:lag"))
    head = StoredEvent.objects.order_by("-id").values_list("id", flat=True).first()
    assert head is not None
    ConsumerCursor.objects.create(name=name, position=head - 1)
    caught_up = f"{name}.done"
    ConsumerCursor.objects.create(name=caught_up, position=head)
    body = metrics_view(RequestFactory().get("/metrics")).content.decode()
    assert f'eventbus_consumer_lag_events{{consumer="{name}"}} 1.0' in body
    assert f'eventbus_consumer_lag_events{{consumer="{caught_up}"}} 0.0' in body
    lag_seconds = sample("eventbus_consumer_lag_seconds", consumer=name)
    assert lag_seconds is not None and 0 <= lag_seconds < 600
    assert "eventbus_process_published_total" in body


async def test_a_consumers_span_is_a_child_of_the_request_that_made_the_event(
    spans: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("POST /products") as request_span:
        event = await orm(lambda: make_event("obs:traced", EventType.UPDATED, {"pk": 1}))
    assert "traceparent" in event.metadata
    seen: list[Event] = []
    consumer = Consumer(name=f"obs.{uuid.uuid4().hex[:8]}", pattern="obs:*", func=seen.append, durable=False)
    await run_consumers([consumer], [event], lambda: len(seen) == 1)

    (handle,) = [s for s in spans.get_finished_spans() if s.name == "handle obs:traced"]
    request_context = request_span.get_span_context()
    assert handle.kind is trace.SpanKind.CONSUMER
    assert handle.context is not None and handle.context.trace_id == request_context.trace_id
    assert handle.parent is not None and handle.parent.span_id == request_context.span_id
    assert handle.attributes is not None and handle.attributes["messaging.message.id"] == event.event_id


def test_the_publish_span_follows_the_events_trace(spans: InMemorySpanExporter) -> None:
    from django_eventbus.capture.outbox import flush_pending

    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("POST /orders") as request_span:
        publish("obs:pub", make_event("obs:pub"))
    flush_pending()
    (span,) = [s for s in spans.get_finished_spans() if s.name == "publish obs:pub"]
    assert span.kind is trace.SpanKind.PRODUCER
    assert span.parent is not None and span.parent.span_id == request_span.get_span_context().span_id


def test_without_a_configured_tracer_provider_nothing_is_traced_or_injected() -> None:
    # The API alone (no SDK set up by the application): spans would be no-ops, so the
    # event carries no context and the handle/publish paths do no tracing work.
    from django_eventbus import tracing

    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    with trace.get_tracer("tests").start_as_current_span("request"):
        assert make_event("obs:untraced").metadata == {}
    assert tracing.inject({"a": 1}) == {"a": 1}


def test_eventbus_listen_serves_prometheus_metrics(use_bus: Any) -> None:
    import urllib.request

    from tests.services import free_port, require_redis
    from tests.websocket_support import Server, stack_env

    bus = use_bus("redis")["BUS"]
    port = free_port()
    env = stack_env(bus_url=require_redis(), bus_prefix=bus["channel_prefix"])
    command = [sys.executable, "manage.py", "eventbus_listen", "--metrics-port", str(port)]
    command += ["--metrics-addr", "127.0.0.1"]
    listener = Server("metrics", command, env)
    try:
        listener.wait_for_output("listening on")
        body = ""
        deadline = time.monotonic() + 20
        while "eventbus_bus_connected" not in body:
            assert time.monotonic() < deadline, body[-500:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    body = response.read().decode()
            except OSError:
                time.sleep(0.05)
        assert 'eventbus_bus_connected{backend="redis"} 1.0' in body
        assert "eventbus_process_published_total" in body and "eventbus_publish_seconds" in body
        # A port that is taken: one line, non-zero exit, no traceback.
        busy = subprocess.run(
            command,
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode != 0 and "Traceback" not in busy.stderr
        assert f"cannot serve metrics on 127.0.0.1:{port}" in busy.stderr
    finally:
        listener.stop()
