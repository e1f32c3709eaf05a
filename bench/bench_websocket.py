"""Benchmark: model save -> websocket frame, through daphne and both channels-redis layers.

Run from the repository root (Redis on ``REDIS_URL``, PostgreSQL if reachable)::

    python bench/bench_websocket.py            # 1,000 clients, ~2 minutes
    python bench/bench_websocket.py --quick    # 200 clients, fewer rounds

For each channel layer (``RedisPubSubChannelLayer``, then ``RedisChannelLayer``)
it starts the real stack: ``--servers`` daphne processes serving
``testproject.asgi`` and one ``manage.py eventbus_listen`` (the forwarder) on a
Redis event bus, with the database on PostgreSQL (a scratch database,
``eventbus_bench_ws``, created and dropped) or a SQLite file. Then:

* **baseline** -- the layer alone in this process: ``group_send`` to a group of one
  member and ``receive``, each awaited (messages/s, p50/p99 latency);
* **fan-out** -- ``--clients`` websocket clients (spread over the servers) subscribe to
  ``inventory:product``; ``Product.objects.create()`` in this process; the time from
  just before ``create()`` until each client has read the frame. Repeated
  ``--rounds`` times; reported: p50/p99/max over all client deliveries, and the
  median and worst over rounds of "the last client got it";
* **single client** -- one client, ``--saves`` saves ~5 ms apart; save -> frame
  latency p50/p99/max; and ``create()`` alone for comparison.

Times come from one clock (``perf_counter`` in this process, which also runs the
clients), so the client-side cost of reading 1,000 frames in one Python process
is included: the fan-out figures are pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("EVENTBUS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BENCH_DB = "eventbus_bench_ws"
LAYERS = {
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    "core": "channels_redis.core.RedisChannelLayer",
}


# -- helpers -------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def reachable(url: str, port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or port), timeout=2):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> None:
    # 1,000 client sockets here, and as many in the servers.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def prepare_database() -> tuple[str, Any]:
    """A DATABASE_URL for a fresh, migrated database, and a function that drops it."""
    if reachable(PG_ADMIN_URL, 5432):
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}"')
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
        parts = urlsplit(PG_ADMIN_URL)
        url = f"postgres://{parts.netloc}/{BENCH_DB}"

        def drop() -> None:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')

        label = "PostgreSQL"
    else:
        path = Path(f"/tmp/{BENCH_DB}-{os.getpid()}.sqlite3")
        url = f"sqlite:///{path}"

        def drop() -> None:
            path.unlink(missing_ok=True)

        label = "SQLite"
    env = {**os.environ, "DATABASE_URL": url}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    print(f"database: {label} ({url})")
    return url, drop


class Stack:
    """daphne servers + one eventbus_listen, for one channel layer."""

    def __init__(self, layer: str, servers: int, env: dict[str, str]) -> None:
        self.env = {
            **env,
            "CHANNEL_LAYER_URL": REDIS_URL,
            "CHANNEL_LAYER_BACKEND": layer,
            "CHANNEL_LAYER_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
            "EVENTBUS_LOG": "WARNING",
        }
        self.ports = [free_port() for _ in range(servers)]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.layer = layer

    def __enter__(self) -> Stack:
        def unlimited() -> None:
            raise_fd_limit()

        listener = [sys.executable, "manage.py", "eventbus_listen"]
        self.processes.append(
            subprocess.Popen(listener, cwd=REPO, env=self.env, stderr=subprocess.PIPE, preexec_fn=unlimited)
        )
        for port in self.ports:
            self.processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "daphne",
                        "-b",
                        "127.0.0.1",
                        "-p",
                        str(port),
                        "testproject.asgi:application",
                    ],
                    cwd=REPO,
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(f"/tmp/bench-daphne-{port}.log", "wb")
                    if os.environ.get("BENCH_DEBUG")
                    else subprocess.DEVNULL,
                    preexec_fn=unlimited,
                )
            )
        deadline = time.monotonic() + 60
        assert self.processes[0].stderr is not None
        seen = b""
        while b"listening on" not in seen:
            if time.monotonic() > deadline or self.processes[0].poll() is not None:
                raise RuntimeError(f"the listener did not start: {seen.decode(errors='replace')}")
            seen += cast("io.BufferedReader", self.processes[0].stderr).read1(4096)
        for port in self.ports:
            while not reachable(f"http://127.0.0.1:{port}", port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daphne on {port} did not start")
                time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


# -- measurements --------------------------------------------------------------------------------


async def baseline(layer: str, count: int) -> dict[str, float]:
    """The layer alone: group_send to one member, then receive it; each awaited."""
    from django.utils.module_loading import import_string

    cls = import_string(LAYERS[layer])
    instance = cls(hosts=[REDIS_URL], prefix=f"base{uuid.uuid4().hex[:8]}")
    channel = await instance.new_channel()
    group = "bench"
    await instance.group_add(group, channel)
    message = {"type": "eventbus.event", "event": {"event_id": "x" * 36, "payload": {"data": "x" * 200}}}
    for _ in range(50):  # warm up connections
        await instance.group_send(group, message)
        await instance.receive(channel)
    latencies = []
    start = time.perf_counter()
    for _ in range(count):
        sent = time.perf_counter()
        await instance.group_send(group, message)
        await instance.receive(channel)
        latencies.append(time.perf_counter() - sent)
    elapsed = time.perf_counter() - start
    await instance.group_discard(group, channel)
    if layer == "core":
        await instance.flush()
    return {"rate": count / elapsed, "p50": pct(latencies, 50), "p99": pct(latencies, 99)}


class Clients:
    """Websocket clients in this process; each records when it read each product's frame."""

    def __init__(self, ports: list[int], count: int, cookie: str) -> None:
        self.ports = ports
        self.count = count
        self.cookie = cookie
        self.arrivals: list[dict[str, float]] = [{} for _ in range(count)]
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.sockets: list[Any] = []
        self.readers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Clients:
        from websockets.asyncio.client import connect

        gate = asyncio.Semaphore(50)  # do not overflow the servers' accept backlog

        async def open_one(index: int) -> Any:
            port = self.ports[index % len(self.ports)]
            async with gate:
                ws = await connect(
                    f"ws://127.0.0.1:{port}/ws/events/",
                    origin=f"http://127.0.0.1:{port}",  # type: ignore[arg-type]
                    additional_headers={"Cookie": f"sessionid={self.cookie}"},
                    open_timeout=60,
                    max_queue=None,
                )
                await ws.send(json.dumps({"type": "subscribe", "topic": "inventory:product"}))
                frame = json.loads(await ws.recv())
                assert frame["type"] == "subscribed", frame
                return ws

        started = time.perf_counter()
        self.sockets = list(await asyncio.gather(*(open_one(i) for i in range(self.count))))
        self.connect_time = time.perf_counter() - started
        self.readers = [asyncio.create_task(self._read(i, ws)) for i, ws in enumerate(self.sockets)]
        return self

    async def _read(self, index: int, ws: Any) -> None:
        arrivals = self.arrivals[index]
        async for data in ws:
            now = time.perf_counter()
            frame = json.loads(data)
            if frame.get("type") != "event":
                continue
            name = frame["event"]["payload"]["fields"]["name"]
            arrivals[name] = now
            waiter = self.waiters.get(name)
            if waiter is not None and not waiter.done() and all(name in a for a in self.arrivals):
                waiter.set_result(None)

    async def wait_all(self, name: str, timeout: float = 10.0) -> int:
        """Wait until every client has ``name``; returns how many did not within ``timeout``."""
        waiter = self.waiters.setdefault(name, asyncio.get_running_loop().create_future())
        if not all(name in a for a in self.arrivals):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, timeout)
        return sum(name not in a for a in self.arrivals)

    async def __aexit__(self, *exc: object) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)


def create_product(name: str) -> None:
    from testproject.inventory.models import Product

    Product.objects.create(name=name, stock=1)


async def fanout(ports: list[int], clients: int, rounds: int, cookie: str) -> dict[str, Any]:
    async with Clients(ports, clients, cookie) as group:
        deliveries: list[float] = []
        lasts: list[float] = []
        missing = 0
        late = 0
        previous: tuple[str, float] | None = None
        for index in range(rounds + 1):
            name = f"fanout-{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            await asyncio.to_thread(create_product, name)
            absent = await group.wait_all(name)
            if previous is not None:
                # Frames of the previous round that only came after this round's event was sent:
                # stuck in the layer until the next message pushed them out.
                late += sum(a.get(previous[0], 0.0) > started for a in group.arrivals)
            previous = (name, started)
            if index == 0:
                continue  # warm-up round (first use of every connection pool)
            missing += absent
            if absent and os.environ.get("BENCH_DEBUG"):
                lost = [i for i, a in enumerate(group.arrivals) if name not in a]
                print(
                    "   missing clients:", lost[:40], "ports:", sorted({ports[i % len(ports)] for i in lost})
                )
            times = [arrivals[name] - started for arrivals in group.arrivals if name in arrivals]
            deliveries.extend(times)
            lasts.append(max(times) if not absent else float("inf"))
            await asyncio.sleep(0.3)
        return {
            "connect": group.connect_time,
            "p50": pct(deliveries, 50),
            "p99": pct(deliveries, 99),
            "max": max(deliveries),
            "last_median": statistics.median(lasts),
            "last_worst": max(lasts),
            "missing": missing,
            "late": late,
        }


async def single(ports: list[int], saves: int, cookie: str) -> dict[str, float]:
    async with Clients(ports[:1], 1, cookie) as group:
        latencies = []
        for index in range(saves + 20):
            name = f"single-{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            await asyncio.to_thread(create_product, name)
            await group.wait_all(name)
            if index >= 20:  # warm-up
                latencies.append(group.arrivals[0][name] - started)
            await asyncio.sleep(0.005)
    return {"p50": pct(latencies, 50), "p99": pct(latencies, 99), "max": max(latencies)}


async def save_alone(saves: int) -> dict[str, float]:
    durations = []
    for index in range(saves + 20):
        started = time.perf_counter()
        await asyncio.to_thread(create_product, f"alone-{index}")
        if index >= 20:
            durations.append(time.perf_counter() - started)
    return {"p50": pct(durations, 50), "p99": pct(durations, 99)}


def make_session() -> str:
    from django.contrib.auth import get_user_model
    from django.test import Client

    user_model = get_user_model()
    user = user_model.objects.filter(username="bench").first() or user_model.objects.create_superuser(
        "bench", "bench@example.com", None
    )
    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="200 clients, 5 rounds, 100 saves")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--servers", type=int, default=2, help="daphne processes (default: 2)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--saves", type=int, default=300)
    parser.add_argument("--layers", default="pubsub,core")
    parser.add_argument(
        "--pool", type=int, default=0, help="Django's psycopg pool in the servers: max connections (0: none)"
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds, args.saves = 200, 5, 100
    if not reachable(REDIS_URL, 6379):
        sys.exit(f"Redis is not reachable at {REDIS_URL}")
    raise_fd_limit()
    db_url, drop = prepare_database()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "DATABASE_URL": db_url,
        "EVENTBUS_URL": REDIS_URL,
        "EVENTBUS_CHANNEL_PREFIX": prefix,
        "DJANGO_DEBUG": "0",
        # One user, one address, every socket: the per-user and per-address limits are not measured here.
        "EVENTBUS_WEBSOCKET_MAX_CONNECTIONS": str(args.clients + 10),
    }
    if args.pool:
        env["DATABASE_POOL"] = str(args.pool)
    os.environ.update(env)
    os.environ.pop("CHANNEL_LAYER_URL", None)  # this process needs no layer of its own
    import django

    django.setup()
    import channels
    import channels_redis
    import daphne

    print(
        f"python {sys.version.split()[0]}, django {django.get_version()}, channels {channels.__version__}, "
        f"channels-redis {channels_redis.__version__}, daphne {daphne.__version__}, cpus {os.cpu_count()}"
    )
    print(
        f"{args.clients} clients over {args.servers} daphne processes, {args.rounds} fan-out rounds, "
        f"{args.saves} single-client saves; bus: Redis pub/sub; forwarder: eventbus_listen; "
        f"database pool: {args.pool or 'none (CONN_MAX_AGE=0)'}\n"
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        cookie = make_session()
        alone = asyncio.run(save_alone(args.saves))
        for layer in args.layers.split(","):
            print(f"-- {LAYERS[layer]}")
            base = asyncio.run(baseline(layer, 2000))
            rate, p99 = f"{base['rate']:,.0f}", ms(base["p99"]).strip()
            print(f"   baseline group_send+receive: {rate} msgs/s, p99 {p99} ms")
            with Stack(layer, args.servers, dict(os.environ)) as stack:
                spread = asyncio.run(fanout(stack.ports, args.clients, args.rounds, cookie))
                print(
                    f"   fan-out to {args.clients}: last client p50 {ms(spread['last_median']).strip()} ms, "
                    f"worst {ms(spread['last_worst']).strip()} ms"
                )
                one = asyncio.run(single(stack.ports, args.saves, cookie))
                print(f"   single client: p50 {ms(one['p50']).strip()} ms, p99 {ms(one['p99']).strip()} ms")
            results[layer] = {"base": base, "fanout": spread, "single": one}
    finally:
        from django.db import connections

        connections.close_all()
        from django_eventbus.delivery.runtime import reset_runner

        reset_runner()
        drop()

    print()
    print("=" * 100)
    header = f"{'':34}" + "".join(f"{LAYERS[k].rsplit('.', 1)[1]:>32}" for k in results)
    print(header)
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("baseline group_send, 1 member", lambda r: f"{r['base']['rate']:>14,.0f} msgs/s"),
        ("  baseline latency p50 / p99 (ms)", lambda r: f"{ms(r['base']['p50'])} / {ms(r['base']['p99'])}"),
        (
            f"fan-out to {args.clients}: p50 / p99 (ms)",
            lambda r: f"{ms(r['fanout']['p50'])} / {ms(r['fanout']['p99'])}",
        ),
        ("  max over all deliveries (ms)", lambda r: f"{ms(r['fanout']['max'])}"),
        ("  last client, median round (ms)", lambda r: f"{ms(r['fanout']['last_median'])}"),
        ("  last client, worst round (ms)", lambda r: f"{ms(r['fanout']['last_worst'])}"),
        ("  not delivered within 10 s (frames)", lambda r: f"{r['fanout']['missing']:8d}"),
        ("  delivered only after the next event", lambda r: f"{r['fanout']['late']:8d}"),
        ("  connect+subscribe all (s)", lambda r: f"{r['fanout']['connect']:8.2f}"),
        ("save -> frame, 1 client p50 (ms)", lambda r: f"{ms(r['single']['p50'])}"),
        ("  p99 / max (ms)", lambda r: f"{ms(r['single']['p99'])} / {ms(r['single']['max'])}"),
    ]
    for label, cell in rows:
        print(f"{label:34}" + "".join(f"{cell(r):>32}" for r in results.values()))
    print(f"{'create() alone p50 / p99 (ms)':34}{ms(alone['p50']):>20} / {ms(alone['p99'])}")
    print()
    print("targets: every one of 1,000 clients within 500 ms; single-client p99 < 10 ms")


if __name__ == "__main__":
    main()
