"""``manage.py eventbus_listen`` in subprocesses, and the model saves they handle.

The listener runs testproject's recorder consumer (``EVENTBUS_RECORD_TO``), which
writes one line per handled event: :func:`recorded` reads them back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from django.db import connections

from django_eventbus.conf import conf
from tests.services import require_postgres, require_redis

ROOT = Path(__file__).resolve().parent.parent


def bus_env(kind: str, prefix: str) -> dict[str, str]:
    """The environment that points a listener process at a real bus of ``kind``."""
    url = {"postgres": "postgres://", "redis": require_redis()}[kind]
    if kind == "postgres":
        require_postgres()
    return {"EVENTBUS_URL": url, "EVENTBUS_CHANNEL_PREFIX": prefix}


def env_of_current_bus() -> dict[str, str]:
    """The environment that points a listener process at this process's bus."""
    bus = conf.raw_bus_config()
    if bus["backend"] == "postgres":
        return {"EVENTBUS_URL": "postgres://", "EVENTBUS_CHANNEL_PREFIX": bus["channel_prefix"]}
    return {"EVENTBUS_URL": bus["url"], "EVENTBUS_CHANNEL_PREFIX": bus["channel_prefix"]}


def save_products(names: list[str], pause: float = 0.0) -> None:
    """Create one Product per name (from a writer thread: closes its connections at the end)."""
    # Imported here: conftest imports this module, possibly before the app registry is ready.
    from testproject.inventory.models import Product

    try:
        for name in names:
            Product.objects.create(name=name, stock=5)
            if pause:
                time.sleep(pause)
    finally:
        connections.close_all()


def start_listener(
    env: dict[str, str],
    record_to: Path,
    database: str,
    *,
    args: tuple[str, ...] = (),
    log_to: Path | None = None,
    ready: str = "listening on",
) -> subprocess.Popen[str]:
    """``manage.py eventbus_listen`` on ``database``, its recorder consumer writing to ``record_to``.

    Returns once its output says ``ready``; the rest of its output goes to ``log_to`` (or nowhere).
    """
    full_env = {
        **os.environ,
        **env,
        "DATABASE_URL": database,
        "EVENTBUS_RECORD_TO": str(record_to),
        "EVENTBUS_CATCHUP_INTERVAL": "0.5",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "manage.py", "eventbus_listen", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    for line in process.stdout:
        if log_to is not None:
            with log_to.open("a") as log:
                log.write(line)
        if ready in line or time.monotonic() > deadline:
            break
    else:
        process.stdout.close()
        raise AssertionError(f"listener exited: {process.wait()}")
    # keep the pipe drained
    threading.Thread(target=drain, args=(process.stdout, log_to), daemon=True).start()
    return process


def drain(stream: IO[str], log_to: Path | None = None) -> None:
    """Read a subprocess's output to its end (a full pipe would block it), copying it to ``log_to``."""
    with stream:
        if log_to is None:
            stream.read()
            return
        with log_to.open("a") as log:
            for line in stream:
                log.write(line)
                log.flush()


def recorded(path: Path) -> list[str]:
    """The event ids the recorder consumer wrote to ``path``, in order, repeats included."""
    if not path.exists():
        return []
    return [line.split(" ")[1] for line in path.read_text().splitlines() if line.count(" ") == 2]
