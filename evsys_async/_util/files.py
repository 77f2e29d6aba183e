"""File writes: atomic replacement, and async writes on both backends.

:func:`atomic_writer` and :func:`write_atomic` replace a file so that a
reader sees the old content or the new, never a mix: the new content goes to a
temporary file beside the target, is flushed and ``fsync``-ed, and moved into
place with ``os.replace`` (then the directory is ``fsync``-ed, so the rename
survives a crash). A failure leaves the old file as it was, removes the
temporary one, and is never silent: :func:`write_atomic` logs it at WARNING
naming the file (or raises it, with ``errors="raise"``); :func:`atomic_writer`
raises it. Every file evsys-async rewrites goes through them (the manifest,
``error.txt``, ``callbacks_state.json``, the store's records, ``metrics.csv``
when its header widens, ``summary.md`` and its chart, a resumed run's trimmed
logs). :func:`append_whole` appends whole lines or none (the store's rows);
the built-in loggers' own row files go through ``callbacks/_writer.py``,
which also holds and retries what a full disk refuses.

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

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import anyio

from .aio import on_asyncio
from .log import get_logger

__all__ = [
    "AsyncFile",
    "append_bytes",
    "append_whole",
    "atomic_writer",
    "open_async",
    "write_atomic",
]

_log = get_logger()


@contextlib.contextmanager
def atomic_writer(
    path: str | os.PathLike[str],
    mode: Literal["w", "wb"] = "w",
    *,
    encoding: str | None = None,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Write ``path`` whole or not at all: yields a file to write the new content to.

    On leaving the block the file is flushed, ``fsync``-ed and moved over
    ``path``; readers see the old content until then. If the block or the
    replacement raises, the temporary file is removed, ``path`` is untouched,
    and the error propagates. Blocks on file I/O: call it from a thread or a
    ``def`` hook. The directory must exist.
    """
    target = Path(path)
    # unique per call: two writers (threads) of one file never share a temp file; a
    # plain open (not mkstemp) keeps the permissions every other file gets (umask)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def write_atomic(
    path: str | os.PathLike[str],
    data: str | bytes,
    *,
    errors: Literal["log", "raise"] = "log",
) -> bool:
    """Replace ``path``'s content with ``data`` (text as UTF-8), atomically and
    durably (see :func:`atomic_writer`). Returns ``True`` once it is in place.

    ``errors="log"`` (the default): an ``OSError`` is logged at WARNING with
    the path and the error, and ``False`` returned; it never raises — for
    files written on the way out (the manifest), where raising would hide why
    the run ended. ``errors="raise"``: the ``OSError`` propagates (the store's
    records: the caller decides).
    """
    try:
        with atomic_writer(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as exc:
        if errors == "raise":
            raise
        _log.warning("could not write file", path=str(path), error=f"{type(exc).__name__}: {exc}")
        return False
    return True


def append_whole(path: str | os.PathLike[str], data: bytes) -> None:
    """Append ``data`` (whole lines) to ``path``, creating it: all of it or none.

    A write the disk refuses part-way (``ENOSPC``, ``EIO``) is cut back off the
    end of the file before the ``OSError`` propagates, so the file never ends
    in a torn line. Blocks on file I/O.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:] if done else data)
        except OSError:
            if done:
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - done)
            raise
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename stands
        pass
    finally:
        os.close(fd)


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
