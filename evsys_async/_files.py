"""Async file writes on both backends.

aiofiles works on asyncio only (under trio it fails with "no running event
loop"), so :func:`open_async` picks aiofiles on asyncio and
``anyio.open_file`` on trio. Both hand each call to a worker thread; an
``async def`` logger should therefore buffer a batch and write it once per
``flush()``, never once per event.

The built-in loggers use plain ``def`` writes in their own thread instead:
measured by ``benchmarks/bench_files.py`` and explained in
``docs/callbacks.md``.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import anyio

from ._async import on_asyncio
from ._log import get_logger

__all__ = ["AsyncFile", "append_bytes", "open_async", "write_atomic"]

_log = get_logger()


class AsyncFile(Protocol):
    """The part of an async file object the helper promises."""

    async def write(self, data: Any, /) -> Any: ...
    async def flush(self) -> Any: ...
    async def aclose(self) -> None: ...


class _AiofilesFile:
    __slots__ = ("_f",)

    def __init__(self, f: Any) -> None:
        self._f = f

    async def write(self, data: Any, /) -> Any:
        return await self._f.write(data)

    async def flush(self) -> Any:
        return await self._f.flush()

    async def aclose(self) -> None:
        await self._f.close()


async def open_async(
    path: str | os.PathLike[str], mode: str = "a", *, encoding: str | None = None
) -> AsyncFile:
    """Open ``path`` for async I/O on the running backend; close with ``aclose()``.

    Raises ``OSError`` like ``open``. Opening runs in a worker thread; a
    cancellation during it may leave the file opened and then closed by the GC.
    """
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    if on_asyncio():
        import aiofiles

        f = await aiofiles.open(os.fspath(path), mode, encoding=encoding)  # type: ignore[call-overload]
        return _AiofilesFile(f)
    file: AsyncFile = await anyio.open_file(path, mode, encoding=encoding)  # type: ignore[call-overload]
    return file


async def append_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Append ``data`` to ``path`` in one write (open, write, close)."""
    f = await open_async(path, "ab")
    try:
        await f.write(data)
    finally:
        await f.aclose()


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> bool:
    """Replace ``path`` with ``data`` atomically and durably: a temp file in the same
    directory, flushed and fsynced, then ``os.replace``. A reader sees the old
    file or the new one, never half of one. A failure is logged at WARNING
    (with the path) and returns ``False``; it never raises.
    """
    target = os.fspath(path)
    tmp = f"{target}.tmp"
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        _log.warning("could not write file", path=target, error=str(exc))
        return False
    return True
