"""Shared helpers of the Channels / websocket / browser tests.

* users with the permissions the authorization tests need;
* an ASGI wrapper that puts a user in the scope (what ``AuthMiddlewareStack`` does);
* the protocol steps through a ``WebsocketCommunicator`` (subscribe, expect a frame);
* real servers in subprocesses (daphne, ``manage.py eventbus_listen``) on the test
  database, with bounded lifetimes: every process is killed by its fixture's finalizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from channels.testing import WebsocketCommunicator
from django.db import connection

from django_eventbus.channels.consumer import EventsConsumer
from django_eventbus.events import Event, EventType
from django_eventbus.models import StoredEvent
from tests.services import free_port

REPO = Path(__file__).resolve().parent.parent
PATH = "/ws/events/"

_consumer_app = EventsConsumer.as_asgi()


def with_user(user: Any, client: str | None = None) -> Callable[..., Any]:
    """The websocket consumer as an ASGI app whose scope carries ``user`` (and the client address)."""
    extra: dict[str, Any] = {"user": user}
    if client is not None:
        extra["client"] = [client, 50000]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> Any:
        return await _consumer_app({**scope, **extra}, receive, send)

    return app


def make_user(
    username: str, *perms: str, staff: bool = False, superuser: bool = False, password: str | None = None
) -> Any:
    """A user with the named permissions (``"inventory.view_product"``).

    No password unless given: hashing one costs a third of a second.
    """
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    user_model = get_user_model()
    if superuser:
        return user_model.objects.create_superuser(username, f"{username}@example.com", password)
    user = user_model.objects.create_user(username, f"{username}@example.com", password, is_staff=staff)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user_model.objects.get(pk=user.pk)  # fresh: no stale permission cache


def event(topic: str, **payload: Any) -> Event:
    return Event(type=EventType.CREATED, topic=topic, payload=payload)


def store(*events: Event) -> list[Event]:
    """Write ``events`` to the event log (what ``since`` replays)."""
    for item in events:
        StoredEvent.from_event(item).save()
    return list(events)


async def subscribe(ws: WebsocketCommunicator, topic: str, **extra: Any) -> dict[str, Any]:
    await ws.send_json_to({"type": "subscribe", "topic": topic, **extra})
    frame: dict[str, Any] = await ws.receive_json_from(timeout=3)
    return frame


async def expect_error(ws: WebsocketCommunicator, code: str) -> dict[str, Any]:
    frame: dict[str, Any] = await ws.receive_json_from(timeout=3)
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert frame["message"]
    return frame


async def expect_event(ws: WebsocketCommunicator, sent: Event) -> None:
    frame = await ws.receive_json_from(timeout=3)
    assert frame == {"type": "event", "event": json.loads(json.dumps(sent.to_dict()))}


def database_url() -> str:
    """A DATABASE_URL that makes another process use this test run's database."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        name = str(settings["NAME"])
        if name == ":memory:" or name.startswith("file:"):
            raise RuntimeError("a server in another process needs a file SQLite test database")
        return "sqlite:///" + str(Path(name).resolve())
    if connection.vendor == "postgresql":
        user = quote(settings.get("USER") or "")
        password = quote(settings.get("PASSWORD") or "")
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = settings.get("HOST") or "127.0.0.1"
        port = settings.get("PORT") or "5432"
        return f"postgres://{auth}{host}:{port}/{settings['NAME']}"
    raise RuntimeError(f"no DATABASE_URL for {connection.vendor}")


def session_cookie(user: Any) -> str:
    """A ``sessionid`` cookie value of ``user`` (sessions live in the shared database)."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


class Server:
    """A subprocess with its output in a file, killed when the test ends."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115  # closed in stop()
            prefix=f"eventbus-{name}-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.process.returncode}):\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not print {text!r}:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            # The whole process group: daphne and the listener start no children, but be sure.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


class Stack:
    """Daphne servers and an ``eventbus_listen`` on the test database, with their environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.servers: list[Server] = []

    def daphne(self, port: int | None = None) -> tuple[Server, int]:
        port = port or free_port()
        server = Server(
            f"daphne-{port}",
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
            self.env,
        )
        self.servers.append(server)
        return server, port

    def listener(self) -> Server:
        server = Server("listener", [sys.executable, "manage.py", "eventbus_listen"], self.env)
        self.servers.append(server)
        return server

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()


def wait_for_port(port: int, server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited:\n{server.output()[-3000:]}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{server.name} is not listening on {port}:\n{server.output()[-3000:]}"
                ) from None
            time.sleep(0.05)


def stack_env(
    *,
    bus_url: str | None,
    bus_prefix: str | None = None,
    layer_url: str | None = None,
    layer_backend: str = "pubsub",
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of the subprocesses: this run's database, a bus and a channel layer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTBUS_", "CHANNEL_LAYER_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="testproject.settings",
        DATABASE_URL=database_url(),
        PYTHONUNBUFFERED="1",
        EVENTBUS_CATCHUP_INTERVAL="0.5",
    )
    if bus_url:
        env["EVENTBUS_URL"] = bus_url
    if bus_prefix:
        env["EVENTBUS_CHANNEL_PREFIX"] = bus_prefix
    if layer_url:
        env["CHANNEL_LAYER_URL"] = layer_url
        env["CHANNEL_LAYER_BACKEND"] = layer_backend
        env["CHANNEL_LAYER_PREFIX"] = f"asgi{uuid.uuid4().hex[:8]}"
    env.update(extra or {})
    return env


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    try:
        yield stack
    finally:
        stack.stop()


def in_thread(func: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Run ``func`` in a fresh thread (no event loop there) and return its result."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(func())
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{func!r} did not finish within {timeout}s")
    if errors:
        raise errors[0]
    return result[0] if result else None
