"""``django_eventbus.metrics``: the counters, and the Prometheus/OpenTelemetry recipes of its docstring."""

from __future__ import annotations

import gc
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from django_eventbus import metrics
from django_eventbus.delivery import runtime
from django_eventbus.events import Event, EventType
from django_eventbus.events.memory import InMemoryEventBus
from django_eventbus.metrics import STAT_DESCRIPTIONS, STAT_NAMES, get_stats, register_bus


@pytest.fixture
def no_runner() -> Iterator[None]:
    runtime.reset_runner()
    yield
    runtime.reset_runner()


def test_names_and_descriptions() -> None:
    assert STAT_NAMES == (
        "published",
        "delivered",
        "dropped",
        "handler_errors",
        "invalid_messages",
        "reconnects",
    )
    assert list(STAT_DESCRIPTIONS) == list(STAT_NAMES)


def test_reading_the_counters_connects_nothing(no_runner: None) -> None:
    assert get_stats() == dict.fromkeys(STAT_NAMES, 0)
    assert runtime._runner is None


def test_counts_the_process_bus(no_runner: None) -> None:
    bus = runtime.get_bus()
    received: list[Event] = []
    bus.subscribe_sync("metrics:test", received.append)
    runner = runtime.get_runner()
    runner.call(lambda b: b.publish("metrics:test", Event(type=EventType.CUSTOM, topic="metrics:test")))

    def boom(event: Event) -> None:
        raise ValueError("handler bug")

    bus.subscribe_sync("metrics:test", boom)
    runner.call(lambda b: b.publish("metrics:test", Event(type=EventType.CUSTOM, topic="metrics:test")))
    stats = get_stats()
    assert stats["published"] == 2
    assert stats["delivered"] >= 2 and stats["handler_errors"] == 1
    assert len(received) == 2


async def test_other_buses_count_once_registered(no_runner: None) -> None:
    bus = InMemoryEventBus()
    await bus.connect()
    await bus.publish("x", Event(type=EventType.CUSTOM, topic="x"))
    assert get_stats()["published"] == 0  # not registered: not this process's bus
    register_bus(bus)
    register_bus(bus)  # idempotent
    assert get_stats()["published"] == 1
    await bus.close()
    del bus
    gc.collect()
    assert get_stats()["published"] == 0  # a forgotten bus is not kept alive by metrics


# -- the recipes in the docstring run as written (against stand-ins of the two libraries) ---------


def recipe(title: str) -> str:
    """The code block following ``**title**`` in the module docstring."""
    doc = metrics.__doc__ or ""
    after = doc.split(f"**{title}**", 1)[1].split("::\n", 1)[1]
    lines = []
    for line in after.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


@pytest.fixture
def fake_modules(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Minimal stand-ins with the API surface the recipes use (the real libraries are not dependencies)."""
    registry: list[Any] = []
    families: list[tuple[str, str, float]] = []

    class CounterMetricFamily:
        def __init__(self, name: str, documentation: str, value: float) -> None:
            families.append((name, documentation, value))

    prometheus = types.ModuleType("prometheus_client")
    core = types.ModuleType("prometheus_client.core")
    core.REGISTRY = types.SimpleNamespace(register=registry.append)  # type: ignore[attr-defined]
    core.CounterMetricFamily = CounterMetricFamily  # type: ignore[attr-defined]
    prometheus.core = core  # type: ignore[attr-defined]

    counters: dict[str, Any] = {}

    class Meter:
        def create_observable_counter(self, name: str, callbacks: list[Any], description: str = "") -> None:
            counters[name] = (callbacks, description)

    class Observation:
        def __init__(self, value: float) -> None:
            self.value = value

    otel = types.ModuleType("opentelemetry")
    otel_metrics = types.ModuleType("opentelemetry.metrics")
    otel_metrics.get_meter = lambda name: Meter()  # type: ignore[attr-defined]
    otel_metrics.CallbackOptions = object  # type: ignore[attr-defined]
    otel_metrics.Observation = Observation  # type: ignore[attr-defined]
    otel.metrics = otel_metrics  # type: ignore[attr-defined]

    for name, module in {
        "prometheus_client": prometheus,
        "prometheus_client.core": core,
        "opentelemetry": otel,
        "opentelemetry.metrics": otel_metrics,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return {"registry": registry, "families": families, "counters": counters}


def test_opentelemetry_recipe(fake_modules: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "get_stats", lambda: {**dict.fromkeys(STAT_NAMES, 0), "reconnects": 2})
    exec(compile(recipe("OpenTelemetry"), "<metrics docstring>", "exec"), {})
    counters = fake_modules["counters"]
    assert set(counters) == {f"eventbus.{name}" for name in STAT_NAMES}
    [callback], description = counters["eventbus.reconnects"]
    assert description == STAT_DESCRIPTIONS["reconnects"]
    assert [o.value for o in callback(None)] == [2]
    [published] = counters["eventbus.published"][0]
    assert [o.value for o in published(None)] == [0]


@pytest.mark.parametrize("title", ["OpenTelemetry"])
def test_docs_show_the_tested_recipes(title: str) -> None:
    # docs/operations.md cannot run them (the libraries are optional): it must show this very code.
    page = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    assert recipe(title).strip() in page
