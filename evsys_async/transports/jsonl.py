"""Envelopes as JSON lines: a sink that appends whole lines, and a reader that
names the file and line of a malformed one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import EventDecodeError
from ..events import Envelope, decode_envelope, encode

__all__ = ["JsonlSink", "read_jsonl"]


class JsonlSink:
    """Appends every envelope to ``path`` as one JSON line, one write per batch.

    The file parses at any moment: only whole lines are written, and a crash
    loses at most the batch in hand. Opened lazily in the sink's thread.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._buffer: list[bytes] = []
        self._file: object = None

    def __call__(self, envelope: Envelope) -> None:
        self._buffer.append(encode(envelope))

    def flush(self) -> None:
        if not self._buffer:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        data = b"\n".join(self._buffer) + b"\n"
        self._file.write(data)  # type: ignore[attr-defined]
        self._file.flush()  # type: ignore[attr-defined]
        self._buffer.clear()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()  # type: ignore[attr-defined]
            self._file = None


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[Envelope]:
    """Yield the envelopes of an event log; blank lines are skipped.

    Raises :class:`EventDecodeError` naming ``file:line`` for a malformed line.
    """
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield decode_envelope(line)
            except EventDecodeError as exc:
                raise EventDecodeError(f"{path}:{lineno}: {exc}") from None
