"""Real ASGI servers on loopback for the tests: Uvicorn on asyncio, Hypercorn on trio.

``async with serving(app) as base_url:`` serves ``app`` (its lifespan included)
on an ephemeral port of 127.0.0.1 in the current event loop, and shuts the
server down gracefully when the block ends.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
import sniffio


def free_port() -> int:
    """A port nothing listens on (bound, then released): a server that is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    async with anyio.create_task_group() as tg:
        if sniffio.current_async_library() == "asyncio":
            import uvicorn

            # bound and listening before serve(): a client may connect at once (the
            # backlog holds it until the lifespan has started)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            port = sock.getsockname()[1]
            config = uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="on", ws="none"
            )
            server = uvicorn.Server(config)
            tg.start_soon(server.serve, [sock])
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
        else:
            import hypercorn
            import hypercorn.trio

            config = hypercorn.Config()
            config.bind = ["127.0.0.1:0"]
            config.errorlog = None
            config.graceful_timeout = 5.0
            stop = anyio.Event()
            binds = await tg.start(
                partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait)
            )
            try:
                yield binds[0]
            finally:
                stop.set()
