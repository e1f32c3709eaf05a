"""Memory backend throughput: one subscriber, ~300-byte payload, each publish awaited.

    python bench/bench_memory.py [--events N] [--repeats R]

Prints our events/s next to a baseline in the same run: a bare loop that calls
the same handler directly (what delivery costs with no bus at all). Issue
target: >= 50,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from django_eventbus.events import Event, EventType, create_event_bus  # noqa: E402
from django_eventbus.events.codec import dumps  # noqa: E402

PAYLOAD = {
    "model": "inventory.product",
    "pk": 12345,
    "fields": {"name": "x" * 215, "price": "19.99", "stock": 7},
}


async def ours(n: int) -> float:
    bus = create_event_bus({"backend": "memory"})
    await bus.connect()
    count = 0

    async def handler(event: Event) -> None:
        nonlocal count
        count += 1

    await bus.subscribe("bench", handler)
    start = time.perf_counter()
    for _ in range(n):
        await bus.publish("bench", Event(type=EventType.CREATED, topic="bench", payload=PAYLOAD))
    elapsed = time.perf_counter() - start
    assert count == n
    await bus.close()
    return n / elapsed


async def baseline(n: int) -> float:
    count = 0

    async def handler(event: Event) -> None:
        nonlocal count
        count += 1

    start = time.perf_counter()
    for _ in range(n):
        await handler(Event(type=EventType.CREATED, topic="bench", payload=PAYLOAD))
    elapsed = time.perf_counter() - start
    assert count == n
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="10,000 events, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.events, args.repeats = 10_000, 3
    payload_size = len(dumps(PAYLOAD).encode())
    ours_runs, base_runs = [], []
    for _ in range(args.repeats):  # alternate, so machine noise hits both alike
        base_runs.append(asyncio.run(baseline(args.events)))
        ours_runs.append(asyncio.run(ours(args.events)))
    o, b = statistics.median(ours_runs), statistics.median(base_runs)
    print(f"memory backend, {args.events:,} events x {args.repeats} runs, 1 subscriber")
    print(f"payload: {payload_size} bytes of JSON")
    print(f"{'':34}{'events/s (median)':>20}")
    print(f"{'ours: publish -> handler':34}{o:>20,.0f}")
    print(f"{'baseline: Event() + handler call':34}{b:>20,.0f}")
    print(f"{'ratio ours/baseline':34}{o / b:>20.2f}")
    print(f"target >= 50,000 events/s: {'met' if o >= 50_000 else 'MISSED'}")


if __name__ == "__main__":
    main()
