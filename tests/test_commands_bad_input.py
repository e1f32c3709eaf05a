"""Each management command, given bad input or a server that is down, prints a short error and
exits non-zero: never a traceback. Run as real processes, as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from tests.services import free_port
from tests.websocket_support import REPO, database_url

pytestmark = pytest.mark.django_db(transaction=True)

BAD_ARGUMENTS = [
    (["eventbus_publish", " "], "TOPIC must not be empty"),
    (["eventbus_publish", "inventory:product", "--payload", "{bad"], "is not valid JSON"),
    (["eventbus_publish", "inventory:product", "--payload", "[" * 5000], "--payload"),
    (["eventbus_publish", "inventory:product", "--payload", "[1]"], "must be a JSON object"),
    (["eventbus_publish", "inventory:product", "--type", "nope"], "invalid choice"),
    (["eventbus_prune", "--older-than", "xyz"], "is not a duration"),
    (["eventbus_listen", "--since", "no-such-event", "inventory:*"], "no-such-event"),
    (["eventbus_listen", "--since", "2026-13-45T99:00", "inventory:*"], "2026-13-45"),
    (["eventbus_listen", "--consumer", "no.such.consumer"], "no registered consumer named no.such.consumer"),
    (["eventbus_status", "--timeout", "abc"], "invalid float value"),
]

SERVER_DOWN = [
    ["eventbus_publish", "inventory:product"],
    ["eventbus_prune", "--older-than", "1d"],
    ["eventbus_listen", "--since", "2026-01-01T00:00Z", "inventory:*"],
    ["eventbus_status"],
]


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "testproject.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_short_error(done: subprocess.CompletedProcess[str], expected: str = "") -> None:
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert done.returncode != 0, output
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(("CommandError: ", "manage.py ")), done.stderr
    assert expected in last, done.stderr


@pytest.mark.parametrize(
    ("args", "expected"), BAD_ARGUMENTS, ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else None
)
def test_bad_arguments(args: list[str], expected: str) -> None:
    assert_short_error(run(args, DATABASE_URL=database_url(), EVENTBUS_URL="memory://"), expected)


@pytest.mark.parametrize("args", SERVER_DOWN, ids=lambda v: v[0])
def test_a_database_that_is_down(args: list[str]) -> None:
    down = f"postgres://postgres@127.0.0.1:{free_port()}/nowhere"
    assert_short_error(run(args, DATABASE_URL=down, EVENTBUS_URL="memory://"))


def test_a_redis_bus_that_is_down(settings: Any) -> None:
    down = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    done = run(["eventbus_listen", "inventory:*"], DATABASE_URL=database_url(), EVENTBUS_URL=down)
    assert_short_error(done)
    assert "hunter2-secret" not in done.stdout + done.stderr
