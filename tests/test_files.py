"""The async file helper: aiofiles on asyncio, anyio on trio.

(It tests ``evsys_async/_files.py``; it lives here beside the loggers that
measured it until ``tests/test_files.py`` exists.)
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from evsys_async._files import append_bytes, open_async

pytestmark = pytest.mark.anyio


async def test_open_write_append_on_either_backend(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "x.jsonl"
    with anyio.fail_after(10):
        f = await open_async(path, "w")
        try:
            await f.write('{"a": 1}\n')
            await f.flush()
        finally:
            await f.aclose()
        await append_bytes(path, b'{"a": 2}\n')
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"a": 2}\n'
    if anyio_backend == "asyncio":
        import aiofiles  # noqa: F401 - the asyncio path uses it

        f = await open_async(path, "rb")
        assert type(f).__name__ == "_AiofilesFile"
        await f.aclose()
