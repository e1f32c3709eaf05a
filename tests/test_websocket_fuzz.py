"""10,000 random and mutated frames to one socket: it stays open, answers, and logs no traceback.

The frames come from a seeded generator (a failure names its seed and repeats):
valid protocol frames, the same frames mutated (characters replaced, inserted,
deleted, cut short, brackets piled up), JSON values of every type in every field,
and random text. Every frame is answered by at least one frame; the test sends a
marker after them all and reads until its answer arrives.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from tests.websocket_support import PATH, make_user, with_user

pytestmark = pytest.mark.django_db(transaction=True)

FRAMES = 10_000
SEED = 15

TOPICS = ["inventory:product", "inventory:*", "*", "a:b:c", "*z", "[ab]:?", "ä:ü", "x" * 250, ""]
VALUES: list[Any] = [None, True, 0, -1, 1e308, "", "\ud800", [], {}, [[[]]], {"a": {"b": {}}}, "x" * 70]
ALPHABET = '{}[]":,\\ \t\nabcxyz019-_*?!é\u2028\x00'


def valid_frame(rng: random.Random) -> str:
    frame: dict[str, Any] = {"type": rng.choice(["subscribe", "unsubscribe"]), "topic": rng.choice(TOPICS)}
    if rng.random() < 0.3:
        frame["since"] = rng.choice(["", "0" * 32, "nope"])
    return json.dumps(frame, ensure_ascii=rng.random() < 0.5)


def typed_frame(rng: random.Random) -> str:
    frame = {
        key: rng.choice(VALUES) for key in rng.sample(["type", "topic", "since", "extra"], rng.randint(0, 4))
    }
    if rng.random() < 0.5:
        frame["type"] = rng.choice(["subscribe", "unsubscribe", "publish", "SUBSCRIBE"])
    return json.dumps(rng.choice([frame, list(frame), rng.choice(VALUES)]))


def mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(chars) + 1)
        action = rng.randrange(5)
        if action == 0 and chars:
            chars[min(where, len(chars) - 1)] = rng.choice(ALPHABET)
        elif action == 1:
            chars.insert(where, rng.choice(ALPHABET))
        elif action == 2 and chars:
            del chars[min(where, len(chars) - 1)]
        elif action == 3:
            chars = chars[:where]
        else:
            chars.insert(where, rng.choice("[{") * rng.randint(1, 3000))
    return "".join(chars)


def frames(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.15:
            made.append(valid_frame(rng))
        elif kind < 0.35:
            made.append(typed_frame(rng))
        elif kind < 0.9:
            made.append(mutate(rng, valid_frame(rng)))
        else:
            made.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 80))))
    return made


async def test_ten_thousand_bad_frames_leave_the_socket_open(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # The rate limit would answer most frames itself: switched off to reach the parser and validators.
    settings.EVENTBUS = {**settings.EVENTBUS, "WEBSOCKET_SUBSCRIBE_RATE": 1e9}
    user = await database_sync_to_async(make_user)("admin", superuser=True)
    ws = WebsocketCommunicator(with_user(user), PATH)
    assert (await ws.connect())[0]
    try:
        with caplog.at_level(logging.WARNING):
            for frame in frames(SEED, FRAMES):
                # send_input, not send_to: the communicator refuses an empty frame, a client need not.
                await ws.send_input({"type": "websocket.receive", "text": frame})
            await ws.send_json_to({"type": "unsubscribe", "topic": "fuzz:end"})
            answers = 0
            while True:
                answer = await ws.receive_json_from(timeout=30)
                answers += 1
                if answer.get("topic") == "fuzz:end":
                    break
        assert answer["code"] == "not_subscribed"
        assert answers > FRAMES, f"seed {SEED}: some frames were not answered"
        # Still working: a real subscription is accepted.
        await ws.send_json_to({"type": "subscribe", "topic": "fuzz:ok"})
        while (answer := await ws.receive_json_from(timeout=5)).get("topic") != "fuzz:ok":
            pass
        assert answer["type"] in {"subscribed", "error"}, answer
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    finally:
        await ws.disconnect()
