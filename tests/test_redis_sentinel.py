"""The Redis bus through Redis Sentinel: a real failover, with real processes.

One master, one replica (``--replicaof``) and one sentinel (``redis-server --sentinel``),
each a private process of this test. The master is SIGKILLed; the sentinel promotes the
replica; the bus, which asks the sentinel for the master at every connect, follows.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from django_eventbus.events import BaseEventBus, ConnectionState, Event, EventType, create_event_bus
from django_eventbus.events.bus import parse_bus_url
from django_eventbus.events.redis import RedisEventBus, parse_sentinel_url
from tests.polling import await_until as wait_for
from tests.polling import await_until_async as wait_for_async
from tests.redis_servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SERVICE = "m"
# Seconds: the sentinel marks the master down after 1 s; the promotion itself is quick.
FAILOVER_DEADLINE = 30.0


class SentinelServer(RedisServer):
    """``redis-server <conf> --sentinel``: the sentinel rewrites its config file, so it gets its own."""

    def __init__(self, workdir: Path, master_port: int) -> None:
        super().__init__()
        self.conf = workdir / f"sentinel-{self.port}.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 3000\n"
        )

    async def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await wait_for_async(self._answers, timeout=10, what=f"sentinel on port {self.port}")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="eventbus-sentinel-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def topology(
    throwaway_redis: Callable[..., Awaitable[RedisServer]], workdir: Path
) -> AsyncIterator[tuple[RedisServer, RedisServer, SentinelServer]]:
    """A master, its replica (in sync) and a sentinel that knows both; all killed at teardown."""
    # --dir: a replica writes the RDB of its initial sync there (not into the working tree).
    master = await throwaway_redis("--dir", str(workdir))
    replica = await throwaway_redis("--dir", str(workdir), "--replicaof", "127.0.0.1", str(master.port))
    sentinel = SentinelServer(workdir, master.port)
    try:
        await sentinel.start()
        admin = sentinel.admin()
        replica_admin = replica.admin()
        try:

            async def ready() -> bool:
                info = await replica_admin.info("replication")
                replicas = await admin.sentinel_slaves(SERVICE)
                # A failover needs the sentinel to know an in-sync replica.
                return info.get("master_link_status") == "up" and any(
                    r.get("master-link-status") == "ok" for r in replicas
                )

            await wait_for_async(ready, timeout=20, what="the replica in sync and known to the sentinel")
        finally:
            await admin.aclose()
            await replica_admin.aclose()
        yield master, replica, sentinel
    finally:
        sentinel.kill()


def ev(n: int) -> Event:
    return Event(type=EventType.CREATED, topic="failover", payload={"n": n})


def test_sentinel_url() -> None:
    url = "redis+sentinel://:pw@s1:26379,s2,[::1]:26380/mymaster/2?sentinel_password=spw&client_name=web"
    sentinels, service, redis_url, sentinel_password = parse_sentinel_url(url)
    assert sentinels == [("s1", 26379), ("s2", 26379), ("::1", 26380)]
    assert (service, sentinel_password) == ("mymaster", "spw")
    assert parse_bus_url(url) == {"backend": "redis", "url": url}
    bus = create_event_bus(url)
    assert isinstance(bus, RedisEventBus)
    assert bus.sentinels == sentinels and bus.service_name == "mymaster"
    assert bus.sentinel_kwargs["password"] == "spw"
    kwargs = bus.connection_kwargs
    assert (kwargs["password"], kwargs["db"], kwargs["client_name"]) == ("pw", 2, "web")
    assert "host" not in kwargs and "redis_url" not in kwargs
    with pytest.raises(ValueError, match="service_name"):
        RedisEventBus(sentinels=[("s1", 26379)])
    with pytest.raises(ValueError, match="do not apply"):
        RedisEventBus(sentinels=[("s1", 26379)], service_name="m", host="elsewhere")
    with pytest.raises(ValueError, match=r"/<service_name>"):
        parse_sentinel_url("redis+sentinel://s1:26379")


@pytest.mark.parametrize("url", ["redis+cluster://h:7000", "rediss+cluster://h:7000/0"])
def test_redis_cluster_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="Redis Cluster .* not supported"):
        create_event_bus(url)


async def test_bus_follows_a_sentinel_failover(
    topology: tuple[RedisServer, RedisServer, SentinelServer],
) -> None:
    master, replica, sentinel = topology
    options: dict[str, Any] = {
        "sentinels": [("127.0.0.1", sentinel.port)],
        "service_name": SERVICE,
        "channel_prefix": f"t{uuid.uuid4().hex[:10]}",
    }
    subscriber = RedisEventBus(**options)
    # The other way to say the same: a URL.
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}/0?socket_connect_timeout=2"
    publisher = create_event_bus(
        {"backend": "redis", "url": url, "channel_prefix": options["channel_prefix"]}
    )
    got: list[int] = []
    states: list[str] = []
    subscriber.on_connection_lost(lambda: states.append("lost"))
    subscriber.on_connection_restored(lambda: states.append("restored"))
    try:
        await subscriber.connect()
        await publisher.connect()
        await subscriber.subscribe("failover", lambda event: got.append(event.payload["n"]))
        await publisher.publish("failover", ev(1))
        await wait_for(lambda: got == [1], what="the event before the failover")

        master.kill()
        await wait_for(lambda: states == ["lost"], timeout=5, what="connection lost")
        await wait_for(
            lambda: states == ["lost", "restored"], timeout=FAILOVER_DEADLINE, what="connection restored"
        )
        # The subscriber is on the promoted replica now: a publish finds it there too.
        client = replica.admin()
        try:
            info = await client.info("replication")
        finally:
            await client.aclose()
        assert info["role"] == "master"
        await publisher.publish("failover", ev(2))
        await wait_for(lambda: got == [1, 2], what="the event after the failover")
        assert subscriber.state is ConnectionState.CONNECTED
    finally:
        async with asyncio.timeout(2):  # bounded, even with the old master gone for good
            await subscriber.close()
            await publisher.close()


@pytest.mark.django_db(transaction=True)
async def test_listener_catches_up_from_the_log_after_a_failover(
    topology: tuple[RedisServer, RedisServer, SentinelServer], settings: Any
) -> None:
    """Model saves go on during the failover: the listener handles every one, once."""
    from django_eventbus.delivery.consumers import Consumer
    from django_eventbus.delivery.listener import Listener
    from django_eventbus.delivery.runtime import reset_runner
    from django_eventbus.models import StoredEvent
    from tests.listener_processes import save_products
    from tests.orm import orm

    master, _replica, sentinel = topology
    settings.EVENTBUS = {
        **settings.EVENTBUS,
        "BUS": {
            "backend": "redis",
            "url": f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}/0",
            "channel_prefix": f"t{uuid.uuid4().hex[:10]}",
            "publish_timeout": 2.0,  # saves made while no master exists fail over to the log sooner
        },
    }
    bus = cast(BaseEventBus, create_event_bus(settings.EVENTBUS["BUS"]))
    restored: list[bool] = []
    bus.on_connection_restored(lambda: restored.append(True))
    seen: list[str] = []
    consumer = Consumer(
        name=f"test.sentinel{uuid.uuid4().hex[:6]}",
        pattern="inventory:product",
        func=lambda event: seen.append(event.event_id),
    )
    listener = Listener(bus, [consumer], interval=0.5)
    await bus.connect()
    await listener.start()
    try:
        await asyncio.to_thread(save_products, [f"before{i}" for i in range(50)])
        await wait_for(lambda: len(seen) == 50, timeout=30, what="events before the failover")
        master.kill()
        # Saves go on while there is no master: their publishes fail, the log has them.
        during = [f"during{i}" for i in range(100)]
        writer = asyncio.create_task(asyncio.to_thread(save_products, during, 0.02))
        await wait_for(
            lambda: restored == [True], timeout=FAILOVER_DEADLINE, what="the listener's bus restored"
        )
        await writer
        await asyncio.to_thread(save_products, [f"after{i}" for i in range(50)])
        await wait_for(lambda: len(set(seen)) >= 200, timeout=30, what="all 200 events")
    finally:
        await listener.stop()
        async with asyncio.timeout(2):
            await bus.close()
        await asyncio.to_thread(reset_runner)
    logged = await orm(lambda: set(StoredEvent.objects.values_list("event_id", flat=True)))
    assert len(seen) == len(set(seen)) == 200, "each event exactly once"
    assert set(seen) == logged
