"""Benchmark: the Redis event bus against plain redis.asyncio pub/sub, in one run.

Run from the repository root::

    python bench/bench_redis.py            # ~1 minute
    python bench/bench_redis.py --quick    # a few seconds

The server comes from ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). Both
sides are measured the same way, alternating (raw, ours, raw, ours, ...; the latency
runs in four slices each) so machine noise hits both; per measure the median of the
per-repeat ratios and the ratio of the best values are reported:

* throughput: N publishes, each awaited, until the receiver has all N (events/s);
* latency: one event every ``--interval`` ms, publish call -> handler (p50/p99, µs);
* batch: ``publish_many`` of 100 events per call vs. 100 ``PUBLISH`` in one
  non-transactional pipeline per round trip (events/s, until all are received).

"raw" is one ``redis.asyncio.Redis`` client running ``PUBLISH`` and a ``PubSub`` of
another client ``SUBSCRIBE``d and read by ``listen()``, sending a pre-encoded payload
of the same size. "ours" is one bus publishing ``Event`` objects and a second bus (as
another process would have) subscribed with one handler: it encodes each event to
JSON at publish and decodes it on arrival into an ``Event`` that the subscription's
queue hands to the handler, as an application gets it. Each side's messages (raw
payload strings, ``Event`` objects) are built before the clock starts; what building
an ``Event`` and the codec cost per event is printed under the table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from django_eventbus.events import Event, EventType  # noqa: E402
from django_eventbus.events.codec import dumps_event, loads_event  # noqa: E402
from django_eventbus.events.redis import RedisEventBus  # noqa: E402

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TOPIC = "bench:item"
BLOB = "x" * 84  # with the event's other fields, ~300 bytes of JSON
BATCH = 100
WARM_UP = 100  # events sent before a latency run, from the end of EVENTS/PAYLOADS
LATENCY_SLICES = 4


def make_event(seq: int) -> Event:
    return Event(type=EventType.CREATED, topic=TOPIC, payload={"seq": seq, "data": BLOB})


# What raw sends: an encoded event of the same size as ours, with the seq up front so
# the raw receiver reads it without a JSON parse.
RAW_BODY = dumps_event(make_event(0))


def raw_payload(seq: int) -> str:
    return f"{seq}|{RAW_BODY}"


# Built once, before any clock starts (see the module docstring); sized in main().
EVENTS: list[Event] = []
PAYLOADS: list[str] = []


def raw_seq(payload: bytes) -> int:
    return int(payload[: payload.index(b"|")])


async def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the receiver did not get every event in {timeout}s")
        await asyncio.sleep(0.0005)


# -- the two sides ---------------------------------------------------------------


class Raw:
    """Plain redis.asyncio: a client PUBLISHes, a PubSub of another client listens."""

    def __init__(self, on_payload: Callable[[bytes], None]) -> None:
        self.channel = f"bench_{uuid.uuid4().hex[:10]}:{TOPIC}"
        self.on_payload = on_payload

    async def __aenter__(self) -> Raw:
        self.pub = redis.asyncio.Redis.from_url(URL)
        self.sub = redis.asyncio.Redis.from_url(URL)
        self.pubsub = self.sub.pubsub(ignore_subscribe_messages=True)
        await self.pubsub.subscribe(self.channel)
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] == "message":
                self.on_payload(message["data"])

    async def publish(self, seq: int) -> None:
        await self.pub.publish(self.channel, PAYLOADS[seq])

    async def publish_batch(self, first: int) -> None:
        async with self.pub.pipeline(transaction=False) as pipe:
            for payload in PAYLOADS[first : first + BATCH]:
                pipe.publish(self.channel, payload)
            await pipe.execute()

    async def __aexit__(self, *exc: object) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.pubsub.aclose()
        await self.sub.aclose()
        await self.pub.aclose()


class Ours:
    """A publishing bus and a subscribed bus, as two processes would have."""

    def __init__(self, on_event: Callable[[Event], None]) -> None:
        self.prefix = f"bench_{uuid.uuid4().hex[:10]}"
        self.on_event = on_event

    async def __aenter__(self) -> Ours:
        self.pub = RedisEventBus(url=URL, channel_prefix=self.prefix)
        self.sub = RedisEventBus(url=URL, channel_prefix=self.prefix)
        await self.pub.connect()
        await self.sub.connect()
        await self.sub.subscribe(TOPIC, self.on_event)
        return self

    async def publish(self, seq: int) -> None:
        await self.pub.publish(TOPIC, EVENTS[seq])

    async def publish_batch(self, first: int) -> None:
        await self.pub.publish_many(EVENTS[first : first + BATCH])

    async def __aexit__(self, *exc: object) -> None:
        assert self.sub.stats.dropped == 0 and self.sub.stats.invalid_messages == 0, self.sub.stats
        await self.sub.close()
        await self.pub.close()


Side = Callable[[Callable[[Any], None]], Any]  # Raw or Ours


def seq_of(side: Side) -> Callable[[Any], int]:
    return raw_seq if side is Raw else lambda event: int(event.payload["seq"])


# -- the three measurements, written once for both sides ---------------------------


async def throughput(side: Side, n: int) -> float:
    received = 0

    def count(_: Any) -> None:
        nonlocal received
        received += 1

    async with side(count) as s:
        for i in range(200):  # warm-up: connections, caches
            await s.publish(i)
        await wait_until(lambda: received == 200)
        received = 0
        start = time.perf_counter()
        for i in range(n):
            await s.publish(i)
        await wait_until(lambda: received == n)
        return n / (time.perf_counter() - start)


async def paced(
    n: int, interval: float, send: Callable[[int], Awaitable[None]], sent: dict[int, float]
) -> None:
    next_at = time.perf_counter()
    for i in range(n):
        next_at += interval
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[i] = time.perf_counter()
        await send(i)


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50 * 1e6, p99 * 1e6


async def latency(side: Side, n: int, interval: float) -> list[float]:
    """Publish -> handler latencies (s) of ``n`` events paced ``interval`` apart."""
    sent: dict[int, float] = {}
    latencies: list[float] = []
    warm = 0
    seq = seq_of(side)
    first_warm = len(EVENTS) - WARM_UP  # warm-up events have seqs of their own

    def record(message: Any) -> None:
        nonlocal warm
        i = seq(message)
        if i >= first_warm:
            warm += 1
        else:
            latencies.append(time.perf_counter() - sent[i])

    async with side(record) as s:
        for i in range(first_warm, len(EVENTS)):
            await s.publish(i)
        await wait_until(lambda: warm == WARM_UP)
        await paced(n, interval, s.publish, sent)
        await wait_until(lambda: len(latencies) == n)
    return latencies


async def batch(side: Side, n: int) -> float:
    received = 0

    def count(_: Any) -> None:
        nonlocal received
        received += 1

    async with side(count) as s:
        await s.publish_batch(0)
        await wait_until(lambda: received == BATCH)
        received = 0
        start = time.perf_counter()
        for first in range(0, n, BATCH):
            await s.publish_batch(first)
        await wait_until(lambda: received == n)
        return n / (time.perf_counter() - start)


# -- report ----------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    interval = args.interval / 1000
    samples: dict[str, dict[str, list[float]]] = {
        m: {"raw": [], "ours": []} for m in ("throughput", "p50", "p99", "batch")
    }
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
        for name, side in (("raw", Raw), ("ours", Ours)):
            samples["throughput"][name].append(await throughput(side, args.n))
        # In four alternating slices, so that a noisy second of the machine hits both sides.
        latencies: dict[str, list[float]] = {"raw": [], "ours": []}
        for _ in range(LATENCY_SLICES):
            for name, side in (("raw", Raw), ("ours", Ours)):
                latencies[name] += await latency(side, args.latency_n // LATENCY_SLICES, interval)
        for name, values in latencies.items():
            p50, p99 = percentiles(values)
            samples["p50"][name].append(p50)
            samples["p99"][name].append(p99)
        for name, side in (("raw", Raw), ("ours", Ours)):
            samples["batch"][name].append(await batch(side, args.batch_n))
    return samples


ROWS = [  # key, label, higher is better, target ratio ours/raw
    ("throughput", "throughput, each awaited (ev/s)", True, 0.8),
    ("p50", "latency p50 (µs)", False, 1.25),
    ("p99", "latency p99 (µs)", False, 1.25),
    ("batch", f"batch of {BATCH} (ev/s)", True, 0.8),
]


def report(samples: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    print(
        f"Redis pub/sub, ~{len(RAW_BODY)}-byte events, one subscriber, {args.repeats} alternating "
        f"repeat(s); {URL.rsplit('@', 1)[-1]}"
    )
    print(f"throughput n={args.n}, latency n={args.latency_n} every {args.interval:g} ms, ", end="")
    print(f"batch n={args.batch_n}")
    header = (
        f"{'measure':<33}{'raw med':>10}{'ours med':>10}{'ratio':>8}"
        f"{'raw best':>10}{'ours best':>10}{'ratio':>8}  target (median / best)"
    )
    print(header)
    print("-" * len(header))
    for key, label, higher, target in ROWS:
        raw, ours = samples[key]["raw"], samples[key]["ours"]
        best = max if higher else min
        # Each repeat ran raw then ours back to back: the ratio within a repeat compares
        # neighbours in time, so its median shrugs off a noisy stretch of the machine.
        paired = statistics.median(o / r for o, r in zip(ours, raw, strict=True))
        best_ratio = best(ours) / best(raw)
        verdicts = [
            "ok" if (x >= target if higher else x <= target) else "MISSED" for x in (paired, best_ratio)
        ]
        print(
            f"{label:<33}{statistics.median(raw):>10,.0f}{statistics.median(ours):>10,.0f}{paired:>7.2f}x"
            f"{best(raw):>10,.0f}{best(ours):>10,.0f}{best_ratio:>7.2f}x  "
            f"{'>=' if higher else '<='} {target}x {' / '.join(verdicts)}"
        )
    print("ratio = ours/raw: median of the per-repeat ratios, and of the best values")
    print("raw = redis.asyncio PUBLISH + PubSub.listen(); raw batch = pipeline(transaction=False) of 100")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (one repeat, fewer events)")
    parser.add_argument("-n", type=int, default=None, help="events for the throughput test")
    parser.add_argument("--latency-n", type=int, default=None, help="events for the latency test")
    parser.add_argument("--batch-n", type=int, default=None, help="events for the batch test")
    parser.add_argument("--interval", type=float, default=2.0, help="ms between paced events")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats")
    args = parser.parse_args()
    args.n = args.n or (1000 if args.quick else 5000)
    args.latency_n = args.latency_n or (500 if args.quick else 2000)
    args.batch_n = args.batch_n or (2000 if args.quick else 20000)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.batch_n -= args.batch_n % BATCH
    size = max(args.n, args.latency_n, args.batch_n, 200) + WARM_UP
    EVENTS.extend(make_event(seq) for seq in range(size))
    PAYLOADS.extend(raw_payload(seq) for seq in range(size))
    # Tens of thousands of long-lived containers would make every full collection slow,
    # and punish the side that allocates more: keep them out of the collector's way.
    gc.collect()
    gc.freeze()
    report(asyncio.run(run(args)), args)
    build, dumps, loads = codec_costs()
    print(
        f"per event, not in the clocks above: building an Event {build:.1f} µs; in them (ours only): "
        f"dumps_event {dumps:.1f} µs, loads_event {loads:.1f} µs"
    )
    return 0


def codec_costs(rounds: int = 20000) -> tuple[float, float, float]:
    """What the core costs per event on this machine (best of 3), to read the ratios against."""
    event = EVENTS[0]
    data = dumps_event(event).encode()

    def best(step: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(rounds):
                step()
            times.append((time.perf_counter() - start) / rounds * 1e6)
        return min(times)

    return best(lambda: make_event(1)), best(lambda: dumps_event(event)), best(lambda: loads_event(data))


if __name__ == "__main__":
    sys.exit(main())
