"""Throwaway ``redis-server`` processes for the fault tests (fixture ``throwaway_redis`` in conftest).

Killing clients or the server of one of these never disturbs anyone else using the shared Redis.
"""

from __future__ import annotations

import subprocess

import redis.asyncio
import redis.exceptions

from tests.polling import await_until_async
from tests.services import free_port


class RedisServer:
    """A ``redis-server`` subprocess of our own: stop it, start it again on the same port."""

    def __init__(self, *args: str, unix_socket: str | None = None) -> None:
        self.port = free_port()
        self.args = list(args)
        self.unix_socket = unix_socket
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--daemonize", "no", *self.args]
        if self.unix_socket:
            command += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await await_until_async(self._answers, timeout=10, what=f"redis-server on port {self.port}")

    async def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.process.returncode}")
        client = redis.asyncio.Redis(port=self.port, socket_connect_timeout=1)
        try:
            return bool(await client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
            return False
        finally:
            await client.aclose()

    def stop(self) -> None:
        """SIGTERM, as a restart by an operator would; wait until the process is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def admin(self) -> redis.asyncio.Redis:
        return redis.asyncio.Redis(port=self.port)
