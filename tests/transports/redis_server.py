"""A Redis server of the test's own, on a free port, that the test may stop and start.

The shared server on 6379 is never touched: outage tests start ``redis-server
--port <free> --save '' --appendonly no`` here (no persistence: a restart
comes back empty, as a cache node does) and wait for its "Ready to accept
connections" line, not for a clock.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.servers import free_port


class OwnRedis:
    """``start()``/``stop()`` a redis-server on ``port``; ``url`` reaches it."""

    def __init__(self, *, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[str] | None = None
        self._drain = threading.Thread()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:
            seen.append(line)
            if "Ready to accept connections" in line:
                # keep reading its log, so a full pipe never blocks the server
                self._drain = threading.Thread(target=self.proc.stdout.read, daemon=True)
                self._drain.start()
                return
        raise RuntimeError(f"redis-server did not start:\n{''.join(seen)}")

    def stop(self) -> None:
        """Stop the server and wait until it is gone (its port refuses connections)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self._drain.join(timeout=30)  # EOF once the server is gone
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.proc = None


@contextmanager
def own_redis(*, password: str | None = None) -> Iterator[OwnRedis]:
    server = OwnRedis(password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()
