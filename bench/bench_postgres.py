"""Benchmark: the PostgreSQL event bus against plain psycopg LISTEN/NOTIFY, in one run.

Run from the repository root::

    python bench/bench_postgres.py            # about a minute
    python bench/bench_postgres.py --quick    # a few seconds

The server comes from ``EVENTBUS_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``). Both sides are measured the
same way, alternating (raw, ours, raw, ours, ...) so machine noise hits both; the
median and the best of the repeats are reported, the targets checked on the median:

* throughput: N publishes, each awaited, until the receiver has all N (events/s);
* latency: one event every ``--interval`` ms, publish call -> handler (p50/p99, µs);
* batch: ``publish_many`` of 100 events per call vs. 100 ``pg_notify`` per round trip.

"raw" is one psycopg ``AsyncConnection`` running ``SELECT pg_notify(%s, %s)`` and a
second one reading ``notifies()``; it sends a string as long as our encoded event and
its receiver only counts. "ours" is one bus publishing and a second bus (as another
process would have) subscribed with one handler, all in this process and event loop
like raw. Both build what they send before the clock starts (raw its strings, ours its
``Event`` objects); ours encodes, checks and chunks each event on publish, and decodes it
and hands it to the subscription's queue and worker on arrival.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import time
import timeit
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from django_eventbus.events import Event, EventType  # noqa: E402
from django_eventbus.events.codec import dumps, dumps_event, loads_event  # noqa: E402
from django_eventbus.events.postgres import PostgresEventBus  # noqa: E402

URL = os.environ.get("EVENTBUS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TOPIC = "bench:item"
BLOB = "x" * 270  # with the key and seq, a payload of ~300 bytes of JSON
BATCH = 100


def make_event(seq: int) -> Event:
    return Event(type=EventType.CREATED, topic=TOPIC, payload={"seq": seq, "data": BLOB})


# What raw sends: an encoded event of the same size as ours, with the seq up front so
# the raw receiver can read it without a JSON parse.
RAW_BODY = dumps_event(make_event(0))


def raw_payload(seq: int) -> str:
    return f"{seq}|{RAW_BODY}"


def raw_seq(payload: str) -> int:
    return int(payload[: payload.index("|")])


async def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the receiver did not get every event")
        await asyncio.sleep(0.0005)


class Side:
    """One side of the comparison: a sender, a receiver that counts, and what to send.

    ``on_seq``, when set, is called with each received item's sequence number.
    """

    received = 0
    on_seq: Callable[[int], None] | None = None

    def items(self, seqs: range) -> list[Any]:
        raise NotImplementedError

    async def send(self, item: Any) -> None:
        raise NotImplementedError

    async def send_batch(self, items: list[Any]) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Side:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


class Raw(Side):
    """Two plain psycopg connections: one NOTIFYs, one LISTENs."""

    name = "raw"

    def __init__(self) -> None:
        self.channel = f"bench_{uuid.uuid4().hex[:10]}"

    async def __aenter__(self) -> Raw:
        self.pub = await psycopg.AsyncConnection.connect(URL, autocommit=True)
        self.sub = await psycopg.AsyncConnection.connect(URL, autocommit=True)
        await self.sub.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel)))
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for notify in self.sub.notifies():
            self.received += 1
            if self.on_seq is not None:
                self.on_seq(raw_seq(notify.payload))

    def items(self, seqs: range) -> list[str]:
        return [raw_payload(i) for i in seqs]

    async def send(self, item: str) -> None:
        await self.pub.execute("SELECT pg_notify(%s, %s)", (self.channel, item))

    async def send_batch(self, items: list[str]) -> None:
        # psycopg's batch API: executemany runs in pipeline mode, one round trip.
        async with self.pub.cursor() as cur:
            await cur.executemany("SELECT pg_notify(%s, %s)", [(self.channel, p) for p in items])

    async def __aexit__(self, *exc: object) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.sub.close()
        await self.pub.close()


class Ours(Side):
    """A publishing bus and a subscribed bus, as two processes would have."""

    name = "ours"

    async def __aenter__(self) -> Ours:
        prefix = f"bench_{uuid.uuid4().hex[:10]}"
        self.pub = PostgresEventBus(URL, channel_prefix=prefix)
        self.sub = PostgresEventBus(URL, channel_prefix=prefix)
        await self.pub.connect()
        await self.sub.connect()
        await self.sub.subscribe(TOPIC, self._handle)
        return self

    def _handle(self, event: Event) -> None:
        self.received += 1
        if self.on_seq is not None:
            self.on_seq(event.payload["seq"])

    def items(self, seqs: range) -> list[Event]:
        return [make_event(i) for i in seqs]

    async def send(self, item: Event) -> None:
        await self.pub.publish(TOPIC, item)

    async def send_batch(self, items: list[Event]) -> None:
        await self.pub.publish_many(items)

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.close()
        await self.pub.close()


# -- the three measurements, written once for both sides ---------------------------


@contextlib.contextmanager
def settled_gc() -> Iterator[None]:
    """Collect, then keep what exists now (the prepared messages) out of the collector's way.

    Thousands of prepared ``Event`` objects would make each full collection slow and punish
    the side that sends containers rather than strings; per-event garbage is still collected.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def rate(side: Side, send: Callable[[Any], Awaitable[None]], items: list[Any], n: int) -> float:
    """Send ``items`` one call after the other, each awaited, until ``n`` arrived: events/s."""
    side.received = 0
    with settled_gc():
        start = time.perf_counter()
        for item in items:
            await send(item)
        await wait_until(lambda: side.received == n)
        return n / (time.perf_counter() - start)


async def throughput(side: Side, n: int) -> float:
    async with side:
        await rate(side, side.send, side.items(range(200)), 200)  # warm-up: prepared statement, caches
        return await rate(side, side.send, side.items(range(n)), n)


async def batch(side: Side, n: int) -> float:
    async with side:
        await rate(side, side.send_batch, [side.items(range(BATCH))], BATCH)
        batches = [side.items(range(first, first + BATCH)) for first in range(0, n, BATCH)]
        return await rate(side, side.send_batch, batches, n)


async def latency(side: Side, n: int, interval: float) -> tuple[float, float]:
    """One event every ``interval`` seconds; p50 and p99 of publish call -> receiver, in µs."""
    async with side:
        await rate(side, side.send, side.items(range(100)), 100)
        items = side.items(range(n))
        sent: list[float] = [0.0] * n
        latencies: list[float] = []
        side.on_seq = lambda seq: latencies.append(time.perf_counter() - sent[seq])
        with settled_gc():
            next_at = time.perf_counter()
            for seq, item in enumerate(items):
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[seq] = time.perf_counter()
                await side.send(item)
            await wait_until(lambda: len(latencies) == n)
    ordered = sorted(latencies)
    return ordered[n // 2] * 1e6, ordered[min(n - 1, int(n * 0.99))] * 1e6


# -- report ----------------------------------------------------------------------


MEASURES = [  # key, label, higher is better, target for the ratio ours/raw
    ("throughput", "throughput, each awaited (ev/s)", True, 0.8),
    ("p50", "latency p50 (µs)", False, 1.25),
    ("p99", "latency p99 (µs)", False, 1.25),
    ("batch", f"batch of {BATCH} (ev/s)", True, None),
]


async def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Every measure, raw then ours, ``args.repeats`` times."""
    samples: dict[str, dict[str, list[float]]] = {key: {"raw": [], "ours": []} for key, *_ in MEASURES}
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
        for side in (Raw(), Ours()):
            samples["throughput"][side.name].append(await throughput(side, args.n))
        for side in (Raw(), Ours()):
            p50, p99 = await latency(side, args.latency_n, args.interval / 1000)
            samples["p50"][side.name].append(p50)
            samples["p99"][side.name].append(p99)
        for side in (Raw(), Ours()):
            samples["batch"][side.name].append(await batch(side, args.batch_n))
    return samples


def report(samples: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    payload_bytes = len(dumps(make_event(0).payload).encode())
    print(
        f"PostgreSQL LISTEN/NOTIFY on {URL.rsplit('@', 1)[-1]}: {payload_bytes}-byte payload "
        f"({len(RAW_BODY)}-byte event), one subscriber, {args.repeats} alternating repeat(s)"
    )
    print(f"throughput n={args.n}; latency n={args.latency_n}, one every {args.interval:g} ms; ", end="")
    print(f"batch n={args.batch_n}")
    header = (
        f"{'measure':<33}{'raw med':>10}{'ours med':>10}{'ratio':>8}"
        f"{'raw best':>10}{'ours best':>10}{'ratio':>8}  target (on the median)"
    )
    print(header)
    print("-" * len(header))
    for key, label, higher, target in MEASURES:
        raw, ours = samples[key]["raw"], samples[key]["ours"]
        best = max if higher else min
        med_raw, med_ours = statistics.median(raw), statistics.median(ours)
        ratio = med_ours / med_raw
        if target is None:
            verdict = "-"
        else:
            ok = ratio >= target if higher else ratio <= target
            verdict = f"{'>=' if higher else '<='} {target}x {'ok' if ok else 'MISSED'}"
        print(
            f"{label:<33}{med_raw:>10,.0f}{med_ours:>10,.0f}{ratio:>7.2f}x"
            f"{best(raw):>10,.0f}{best(ours):>10,.0f}{best(ours) / best(raw):>7.2f}x  {verdict}"
        )
    print(f"raw batch: psycopg executemany (pipeline mode), one round trip per {BATCH}")
    print(core_costs())


def core_costs() -> str:
    """What the framework-free core costs per event here, to read the ratios against."""
    event = make_event(1)
    data = dumps_event(event)

    def per_call(step: Callable[[], object]) -> float:
        return min(timeit.repeat(step, number=2000, repeat=3)) / 2000 * 1e6

    build = per_call(lambda: make_event(1))
    return (
        f"core, per event, warm (best of 3): Event() {build:.1f} µs (not in the clocks above), "
        f"dumps_event {per_call(lambda: dumps_event(event)):.1f} µs, "
        f"loads_event {per_call(lambda: loads_event(data)):.1f} µs"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (one repeat, fewer events)")
    parser.add_argument("-n", type=int, default=None, help="events for the throughput test")
    parser.add_argument("--latency-n", type=int, default=None, help="events for the latency test")
    parser.add_argument("--batch-n", type=int, default=None, help="events for the batch test")
    parser.add_argument("--interval", type=float, default=2.0, help="ms between paced events")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats (median reported)")
    args = parser.parse_args()
    args.n = args.n or (1000 if args.quick else 5000)
    args.latency_n = args.latency_n or (500 if args.quick else 2000)
    args.batch_n = args.batch_n or (2000 if args.quick else 20000)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.batch_n -= args.batch_n % BATCH

    report(asyncio.run(run(args)), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
