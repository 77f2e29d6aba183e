"""Real ASGI servers on loopback for the tests (Uvicorn on asyncio, Hypercorn on trio),
the examples as modules, and a server-sent-events reader.

``async with serving(app) as base_url:`` serves ``app`` (its lifespan included)
on an ephemeral port of 127.0.0.1 in the current event loop, and shuts the
server down gracefully when the block ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from types import ModuleType
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


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and msgspec look their module up
    spec.loader.exec_module(module)
    return module


async def read_sse(client: Any, url: str, connected: Any = None) -> list[tuple[int, str, Any]]:
    """GET ``url`` as server-sent events until the stream ends: ``(id, event, data)``
    each; sets ``connected`` once the response has started."""
    out: list[tuple[int, str, Any]] = []
    async with client.stream("GET", url, timeout=None) as response:
        assert response.status_code == 200, response.status_code
        assert response.headers["content-type"].startswith("text/event-stream")
        if connected is not None:
            connected.set()
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if not line:
                if "data" in fields:
                    out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return out
