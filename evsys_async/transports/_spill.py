"""An append-only file of ``(stream, data)`` records, read back in order.

The Redis sink keeps what it cannot send in memory up to a bound, then here:
records are appended at the end and read from a cursor at the front, so the
order in which they were accepted is the order in which they are sent. Each
record is ``<u32 len(stream)><u32 len(data)><stream><data>`` (big-endian):
binary-safe, and a torn last record (a crash mid-write) is detected and left
out. Once every record was read and sent the file is truncated to empty and
the sink goes back to memory. A file left behind (Redis still down when the
process ended) is picked up by the next sink given the same path.

One thread uses an instance (the sink's sender thread); nothing here locks.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from .._util.files import write_atomic

__all__ = ["SpillFile"]

_HEADER = struct.Struct(">II")


class SpillFile:
    """Records appended at the end, read from the front; ``len`` is what is unread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._read_at = 0  # the offset of the first unread record
        self._unread = 0
        #: records ever appended by this process (the sink's ``spilled_total``)
        self.appended = 0

    def open_existing(self) -> int:
        """Take up a file a previous sink left behind; returns how many records it holds."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return 0
        self._open()
        assert self._file is not None
        self._file.seek(0)
        count, end = 0, 0
        while True:
            header = self._file.read(_HEADER.size)
            if len(header) < _HEADER.size:
                break
            n_stream, n_data = _HEADER.unpack(header)
            body = self._file.read(n_stream + n_data)
            if len(body) < n_stream + n_data:
                break
            count += 1
            end = self._file.tell()
        if end != self._file.seek(0, os.SEEK_END):
            self._file.truncate(end)  # a torn last record: never half-sent
        self._unread = count
        return count

    def _open(self) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+b")  # noqa: SIM115 - closed in close()

    def __len__(self) -> int:
        return self._unread

    def append(self, records: list[tuple[str, bytes]]) -> None:
        """Append ``records`` at the end (one write, flushed to the OS)."""
        if not records:
            return
        self._open()
        assert self._file is not None
        self._file.seek(0, os.SEEK_END)
        self._file.write(_pack(records))
        self._file.flush()
        self._unread += len(records)
        self.appended += len(records)

    def peek(self, limit: int) -> tuple[list[tuple[str, bytes]], int]:
        """Up to ``limit`` unread records and the offset after them (for :meth:`consume`)."""
        if not self._unread:
            return [], self._read_at
        self._open()
        assert self._file is not None
        f = self._file
        f.seek(self._read_at)
        out: list[tuple[str, bytes]] = []
        while len(out) < min(limit, self._unread):
            n_stream, n_data = _HEADER.unpack(f.read(_HEADER.size))
            stream = f.read(n_stream).decode()
            out.append((stream, f.read(n_data)))
        return out, f.tell()

    def consume(self, count: int, offset: int) -> None:
        """Mark ``count`` records read (they were sent); empty the file once all are."""
        self._read_at = offset
        self._unread -= count
        if self._unread == 0 and self._file is not None:
            self._file.truncate(0)
            self._read_at = 0

    def close(self, *, remove_if_empty: bool = True) -> None:
        """Close the file; remove it when nothing is left unread."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if remove_if_empty and self._unread == 0 and self.path.exists():
            self.path.unlink(missing_ok=True)

    def compact(self, front: Sequence[tuple[str, bytes]] = ()) -> None:
        """Rewrite the file as ``front`` followed by the unread records (atomically), so
        a file left behind holds only what was not sent, oldest first."""
        self._open()
        assert self._file is not None
        f = self._file
        f.seek(self._read_at)
        rest = f.read()
        f.close()
        self._file = None
        write_atomic(self.path, _pack(front) + rest, errors="raise")
        self._read_at = 0
        self._unread += len(front)
        self.appended += len(front)
        self._open()


def _pack(records: Sequence[tuple[str, bytes]]) -> bytes:
    parts: list[bytes] = []
    for stream, data in records:
        name = stream.encode()
        parts += (_HEADER.pack(len(name), len(data)), name, data)
    return b"".join(parts)
