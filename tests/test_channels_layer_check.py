"""W102: the Channels tutorial's RedisChannelLayer with redis-py 8 ends idle websockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from django.core.checks import run_checks

from tests.services import require_redis

pytestmark = pytest.mark.skipif(
    int(redis.__version__.split(".")[0]) < 8, reason="redis-py < 8 has no timeout"
)

TUTORIAL = {
    "BACKEND": "channels_redis.core.RedisChannelLayer",
    "CONFIG": {"hosts": ["redis://127.0.0.1:6379"]},
}


def w102(settings: Any, layers: dict[str, Any]) -> list[str]:
    settings.CHANNEL_LAYERS = layers
    return [m.msg for m in run_checks() if m.id == "django_eventbus.W102"]


def test_the_tutorial_layer_is_warned_about_with_the_fix(settings: Any) -> None:
    (message,) = w102(settings, {"default": TUTORIAL})
    assert "CHANNEL_LAYERS['default']" in message and "socket_timeout" in message
    hint = [m.hint for m in run_checks() if m.id == "django_eventbus.W102"][0]
    assert hint is not None and '"socket_timeout": None' in hint and "RedisPubSubChannelLayer" in hint


@pytest.mark.parametrize(
    "layer",
    [
        {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": "redis://x", "socket_timeout": None}]},
        },
        {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {"hosts": ["redis://x"]}},
        {"BACKEND": "channels.layers.InMemoryChannelLayer"},
    ],
)
def test_fixed_or_other_layers_are_not_warned_about(settings: Any, layer: dict[str, Any]) -> None:
    assert w102(settings, {"default": layer}) == []


async def _receive_after_idle(hosts: list[Any], idle: float, prefix: str) -> Any:
    from channels_redis.core import RedisChannelLayer

    layer = RedisChannelLayer(hosts=hosts, prefix=prefix)  # flush() clears only its own prefix
    channel = await layer.new_channel()
    group = f"w102-{channel.rsplit('!', 1)[-1]}"
    await layer.group_add(group, channel)
    receiving = asyncio.ensure_future(layer.receive(channel))
    try:
        # The scenario itself is "nothing to receive for longer than 5 s", not a margin.
        await asyncio.wait({receiving}, timeout=idle)
        if not receiving.done():
            await layer.group_send(group, {"type": "event.message", "n": 1})
        return await asyncio.wait_for(receiving, 30)
    finally:
        receiving.cancel()
        await layer.flush()


async def test_the_warning_is_real_and_the_fix_keeps_an_idle_receiver_alive() -> None:
    url = require_redis().rsplit("/", 1)[0] + "/7"
    broken: object
    fixed: object
    broken, fixed = await asyncio.gather(
        _receive_after_idle([url], 8, "w102-broken"),
        _receive_after_idle([{"address": url, "socket_timeout": None}], 8, "w102-fixed"),
        return_exceptions=True,
    )
    assert isinstance(broken, (TimeoutError, asyncio.TimeoutError, redis.exceptions.TimeoutError)), broken
    assert fixed == {"type": "event.message", "n": 1}
