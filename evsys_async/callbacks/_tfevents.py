"""``EventFile``: a TensorBoard event file written in whole records, its writes checked.

tensorboardX's ``SummaryWriter`` hands every record to a thread of its own
through a ``multiprocessing`` queue (a pickle per scalar); when a write fails
there (a full disk), that thread dies with a traceback on stderr and the
queue fills, so the writer's caller blocks for good, and nothing reports the
loss. ``tensorboard_logger`` therefore builds the records itself (tensorboardX's
protobufs) and writes them here, in the callback's own thread:

* **Whole records or none.** A batch is one ``os.write`` (more only after a
  short write); a write that fails part-way is cut back (``ftruncate``) to the
  end of the last whole record, so TensorBoard never meets a torn record
  followed by good ones (its reader stops at the first bad one).
* **Held, then written in order.** Records the disk refused are held, up to
  ``max_held``, and written before anything newer at the next flush.
* **No silent gap.** Past the bound the file stops for good and
  :attr:`EventFile.degraded` says how many records (one per step, per eval) are
  lost and from which step; so does a file removed under the writer (found by
  an ``fstat`` at each flush) and an ``fsync`` that fails (every
  ``sync_secs`` and at close).

The file's name is tensorboardX's (``events.out.tfevents.<second>.<host>``)
plus ``.<sequence>.<pid>``: TensorBoard reads a directory's files in name
order, so a resume's file opened in the same second as the first segment's
sorts after it instead of replacing it. One callback's thread owns a file;
:meth:`EventFile.add` may also be called from another thread. No method
raises ``OSError`` but :meth:`EventFile.open`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from time import monotonic
from typing import Any

from .._util.log import get_logger
from ..errors import describe
from ..state import Degraded

__all__ = ["DEFAULT_MAX_HELD", "EventFile", "frame", "masked_crc32c"]

_log = get_logger()

#: records held for a retry before the file gives up (a record is ~40-200 bytes)
DEFAULT_MAX_HELD = 50_000

_HEADER = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def masked_crc32c() -> Callable[[bytes], int]:
    """TFRecord's masked CRC-32C: google-crc32c's C code where it is installed (the
    ``tensorboard`` extra brings it; ~0.3 us a record), else tensorboardX's, which is
    pure Python (~9 us a record) unless the ``crc32c`` package is installed."""
    google_crc32c: Any
    try:
        import google_crc32c
    except ImportError:
        google_crc32c = None
    if google_crc32c is None or google_crc32c.implementation != "c":
        from tensorboardX.record_writer import masked_crc32c as slow

        return slow  # type: ignore[no-any-return]
    value: Callable[[bytes], int] = google_crc32c.value

    def masked(data: bytes) -> int:
        x = value(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    return masked


def frame(data: bytes, masked_crc: Callable[[bytes], int]) -> bytes:
    """One TFRecord: ``length (u64) | crc(length) | data | crc(data)``, little-endian."""
    header = _HEADER.pack(len(data))
    return b"".join((header, _CRC.pack(masked_crc(header)), data, _CRC.pack(masked_crc(data))))


class EventFile:
    """A new event file in ``log_dir`` (see the module docstring).

    :meth:`add` queues a framed record with its step; :meth:`write` puts the
    queue on disk; :meth:`close` writes, ``fsync``-s and closes.
    """

    def __init__(
        self, log_dir: Path, *, max_held: int | None = None, sync_secs: float = 30.0
    ) -> None:
        self.log_dir = log_dir
        #: records held for a retry before the file stops (default :data:`DEFAULT_MAX_HELD`)
        self.max_held = DEFAULT_MAX_HELD if max_held is None else max_held
        self.sync_secs = sync_secs
        self.path: Path | None = None
        self._fd: int | None = None
        self._size = 0  # bytes on disk, every one in a whole record
        # a deque: records added from another thread (a benchmark hook run by dispatch)
        # while a write drains it are taken by this write or the next, never lost
        self._queued: deque[tuple[bytes, int | None]] = deque()
        self._held: list[tuple[bytes, int | None]] = []
        self._written = 0  # records in the file
        self._first_step: int | None = None
        self._error: str | None = None
        self._stopped = False
        self._lost = 0
        self._missing_from: int | None = None
        self._synced = monotonic()

    def open(self) -> Path:
        """Create the file; raises ``OSError`` when the directory cannot hold it."""
        earlier = sum(1 for _ in self.log_dir.glob("events.out.tfevents.*"))
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
            f".{earlier:06d}.{os.getpid()}"
        )
        path = self.log_dir / name
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o666)
        self.path = path
        return path

    @property
    def degraded(self) -> Degraded | None:
        """``None`` while every record is on disk; else why not, and what is lost."""
        name = self.path.name if self.path is not None else "event file"
        if self._stopped:
            return Degraded(
                f"{name}: {self._error}", rows_lost=self._lost, missing_from_step=self._missing_from
            )
        if self._held:
            return Degraded(f"{name}: {self._error}; {len(self._held)} records held for a retry")
        return None

    def add(self, record: bytes, step: int | None) -> None:
        """Queue one framed record (:func:`frame`); ``step`` names it in a loss report."""
        self._queued.append((record, step))

    def write(self) -> None:
        """Write what is held, then what is queued, in order; whole records or none."""
        queue = self._queued
        queued = [queue.popleft() for _ in range(len(queue))]
        if self._stopped:
            self._lose(queued)
            return
        batch = self._held + queued
        if not batch or self._fd is None:
            self._held = batch
            return
        if self._gone():
            self._lose(batch)
            return
        data = b"".join(r for r, _ in batch)
        exc = self._append(data)
        if exc is None:
            if self._held:
                _log.info("event file writable again", path=str(self.path), records=len(batch))
            self._held = []
            self._written += len(batch)
            if self._first_step is None:
                self._first_step = next((s for _, s in batch if s is not None), None)
            self._error = None
            if monotonic() - self._synced >= self.sync_secs:
                self.sync()
            return
        if not self._held:
            _log.warning(
                "event file refused a write; holding its records for a retry",
                path=str(self.path),
                error=describe(exc),
            )
        self._error = describe(exc)
        self._held = batch
        if len(batch) > self.max_held:
            self._stop(f"{self._error}; more than {self.max_held} records held")

    def sync(self) -> None:
        """``fsync`` the file: a write-back error surfaces here and stops the file."""
        self._synced = monotonic()
        if self._fd is None or self._stopped:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._error = describe(exc)
            self._lost += self._written
            self._missing_from = self._first_step
            self._stop(f"fsync failed ({self._error}); the file may lack what it was given")

    def close(self) -> None:
        """Write what is left, ``fsync`` and close; records still held are lost."""
        self.write()
        self.sync()
        if self._held:
            self._stop(self._error or "records could not be written")
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                self._error = describe(exc)
                self._stop(f"close failed ({self._error})")

    # -- inside ------------------------------------------------------------------

    def _append(self, data: bytes) -> OSError | None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            with contextlib.suppress(OSError):  # no torn record before the next good one
                os.ftruncate(self._fd, self._size)
            return exc
        self._size += len(data)
        return None

    def _gone(self) -> bool:
        """The file was removed under the writer (its directory deleted)."""
        assert self._fd is not None
        try:
            gone = os.fstat(self._fd).st_nlink == 0
        except OSError:
            gone = True
        if gone and not self._stopped:
            self._lost += self._written
            self._missing_from = self._first_step
            self._error = "the event file was removed during the run"
            self._stop(self._error)
        return gone

    def _lose(self, records: list[tuple[bytes, int | None]]) -> None:
        self._lost += len(records)
        steps = [s for _, s in records if s is not None]
        if steps and (self._missing_from is None or min(steps) < self._missing_from):
            self._missing_from = min(steps)

    def _stop(self, reason: str) -> None:
        held, self._held = self._held, []
        self._lose(held)
        if not self._stopped:
            _log.warning(
                "event file stopped: what it could not write is lost",
                path=str(self.path),
                reason=reason,
                records_lost=self._lost,
            )
        self._stopped = True
        self._error = reason
