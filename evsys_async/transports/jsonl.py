"""Event logs: envelopes as JSON lines behind a header line (``docs/replay.md``).

An event log (a run's ``events.jsonl``) starts with one header line, then
holds one envelope per line::

    {"format":"evsys-async/events","version":1,"run_key":"demo","evsys_async":"0.1.0",...}
    {"bus_id":"5f0c...","seq":0,"event":{"type":"TrainStarted","ts":...,"num_steps":200,...}}

The header comes from :func:`log_header` alone; :class:`JsonlSink` and the
``local_logger`` callback write it when they open a log. A header may recur:
a resumed run appends to its log, and its header marks where the resume
began. Logs written before the header existed still read.

:class:`EventLogReader` reads a log in blocks (one ``msgspec`` call per
block, line by line only where a block holds something unusual), names the
file and line of a malformed one, skips a truncated last line (a writer killed
mid-line), keeps events of unknown types as
:class:`~evsys_async.events.UnknownEvent` and refuses a newer format version.
A line nested deeper than :data:`~evsys_async._util.jsonl.MAX_DEPTH` is
malformed, found before it is decoded. An envelope whose ``(bus_id, seq)``
came earlier in the log is a duplicate: skipped and counted. Within one bus id
the numbers rise through a log (a bus numbers events in publish order, and a
writer appends them in that order), so "earlier" is "not above the highest
number seen for that bus id": one integer per bus id, whatever the log's length.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from .._util.jsonl import MAX_DEPTH, lines_may_nest_deeper, too_deep
from .._version import __version__
from ..errors import EventDecodeError
from ..events import Envelope, Event, decode_envelope, encode, event_types

__all__ = [
    "LOG_FORMAT",
    "LOG_VERSION",
    "EventLogReader",
    "JsonlSink",
    "LogBatch",
    "LogHeader",
    "SkippedLine",
    "log_header",
    "read_jsonl",
]

#: The ``format`` of an event log's header line.
LOG_FORMAT = "evsys-async/events"
#: The format version this package writes and the newest it reads.
LOG_VERSION = 1


class LogHeader(msgspec.Struct, frozen=True, kw_only=True):
    """An event log's header line (``docs/replay.md`` describes each field).

    Unknown fields are ignored, so a later version-1 writer may add some.
    """

    format: str
    version: int
    run_key: str = ""
    #: the version of evsys-async that wrote the log
    evsys_async: str = ""
    #: when the writer opened the log (Unix time, seconds)
    started: float = 0.0
    #: > 0: the log was reopened by a run resumed at this step
    start_step: int = 0
    #: whether events carry ``rank`` (without it every event is rank 0)
    rank_on_events: bool = False


def log_header(*, run_key: str = "", start_step: int = 0) -> bytes:
    """The header line a writer puts at the top of an event log (no newline)."""
    header = LogHeader(
        format=LOG_FORMAT,
        version=LOG_VERSION,
        run_key=run_key,
        evsys_async=__version__,
        started=time.time(),
        start_step=start_step,
        rank_on_events="rank" in Event.__struct_fields__,
    )
    return msgspec.json.encode(header)


class JsonlSink:
    """Appends every envelope to ``path`` as one JSON line, one write per batch.

    The file parses at any moment: only whole lines are written, and a crash
    loses at most the batch in hand. Opened lazily in the sink's thread, with
    a header line first (``run_key`` defaults to the first event's).
    """

    def __init__(self, path: str | os.PathLike[str], *, run_key: str | None = None) -> None:
        self.path = Path(path)
        self.run_key = run_key
        self._buffer: list[bytes] = []
        self._file: IO[bytes] | None = None

    def __call__(self, envelope: Envelope) -> None:
        if self.run_key is None:
            self.run_key = envelope.event.run_key
        self._buffer.append(encode(envelope))

    def flush(self) -> None:
        if not self._buffer:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
            self._buffer.insert(0, log_header(run_key=self.run_key or ""))
        data = b"\n".join(self._buffer) + b"\n"
        self._file.write(data)
        self._file.flush()
        self._buffer.clear()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


# -- reading -------------------------------------------------------------------------


class SkippedLine(msgspec.Struct, frozen=True):
    """A line of an event log that was not read: its 1-based number and why."""

    line: int
    reason: str


class LogBatch:
    """Consecutive lines of an event log: a header (when one starts the batch) and
    the envelopes after it, in file order."""

    __slots__ = ("envelopes", "header", "header_line")

    def __init__(self, header: LogHeader | None = None, header_line: int = 0) -> None:
        self.header = header
        self.header_line = header_line
        #: decoded envelopes: each has ``bus_id``, ``seq`` and ``event`` (see
        #: :meth:`as_envelopes` for :class:`~evsys_async.events.Envelope` objects)
        self.envelopes: list[Any] = []

    def as_envelopes(self) -> list[Envelope]:
        return [
            e if type(e) is Envelope else Envelope(bus_id=e.bus_id, seq=e.seq, event=e.event)
            for e in self.envelopes
        ]


_fast: tuple[dict[str, type[Event]], msgspec.json.Decoder[Any]] | None = None


def _fast_decoder() -> msgspec.json.Decoder[Any]:
    """A decoder of whole envelopes, the event typed by its tag: one call per block.

    Rebuilt when event types are defined (``event_types()`` is then a new dict).
    """
    global _fast
    types = event_types()
    if _fast is None or _fast[0] is not types:
        union: Any = None
        for cls in types.values():
            union = cls if union is None else union | cls
        struct = msgspec.defstruct(
            "_LogEnvelope", [("bus_id", str), ("seq", int), ("event", union)], frozen=True
        )
        # strict=False: JSON has no NaN/inf, so they are written as strings
        _fast = (types, msgspec.json.Decoder(struct, strict=False))
    return _fast[1]


_TRUNCATED = (
    "truncated: the last line ends without a newline and does not parse "
    "(its writer stopped mid-line); skipped"
)
_TOO_DEEP = (
    f"a value nested deeper than {MAX_DEPTH} levels of arrays and objects (no event "
    "nests so deep: the line is damaged, or not an event)"
)


class EventLogReader:
    """Reads an event log batch by batch (see the module docstring).

    :meth:`read` returns the next :class:`LogBatch`, or ``None`` at the end. A
    malformed line (one nested too deep included) raises
    :class:`EventDecodeError` naming ``file:line`` and what was wrong — unless
    ``skip_bad``, which records it in :attr:`skipped` and reads on. A
    truncated last line is recorded there in any case. A duplicated envelope
    is left out of the batches and counted in :attr:`duplicates`. A header of
    another format or of a newer version raises, ``skip_bad`` or not.
    Blocking file I/O: call it off the event loop (replay reads in a daemon
    thread). One thread at a time.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        skip_bad: bool = False,
        block_size: int = 256 * 1024,
    ) -> None:
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.block_size = block_size
        #: lines not read (truncated, or malformed with ``skip_bad``), in file order
        self.skipped: list[SkippedLine] = []
        #: envelopes decoded so far
        self.events = 0
        #: header lines seen so far (the first one included)
        self.headers = 0
        #: envelopes left out because their ``(bus_id, seq)`` came earlier in the log
        self.duplicates = 0
        self._highest: dict[str, int] = {}  # bus id -> highest seq seen
        self._file: IO[bytes] | None = None
        self._lines = 0  # lines consumed so far
        self._carry = b""
        self._eof = False
        self._ready: list[LogBatch] = []
        self._error: EventDecodeError | None = None

    def open(self) -> None:
        """Open the file (``read`` does it too); raises ``FileNotFoundError`` naming it."""
        if self._file is None and not self._eof:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            except FileNotFoundError:
                raise FileNotFoundError(f"no event log at {self.path}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._eof = True

    def read(self) -> LogBatch | None:
        """The next batch: a header with the envelopes after it, or envelopes alone.

        The lines before a malformed one are returned first; the error comes with
        the call after them (and every call after that).
        """
        self.open()
        while True:
            ready = self._ready
            if ready and (len(ready) > 1 or self._eof or self._error or ready[0].envelopes):
                return ready.pop(0)
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            try:
                self._read_block()
            except EventDecodeError as exc:
                self._error = exc

    def _read_block(self) -> None:
        assert self._file is not None
        data = self._carry + self._file.read(self.block_size)
        cut = data.rfind(b"\n")
        if len(data) == len(self._carry):  # the end of the file
            self._carry = b""
            self.close()
            if data.strip():
                self._last_line(data)
            return
        if cut < 0:  # a line longer than a block: read on
            self._carry = data
            return
        block, self._carry = data[: cut + 1], data[cut + 1 :]
        first = self._lines + 1
        self._lines += block.count(b"\n")
        if first == 1:  # the header line, or the first envelope of an older log
            end = block.index(b"\n") + 1
            self._line(block[: end - 1], 1)
            block, first = block[end:], 2
        decoded: list[Any] | None = None
        if not lines_may_nest_deeper(block):  # else a line may be too deep to decode
            try:  # the common case: one call for the whole block
                decoded = _fast_decoder().decode_lines(block)
            except msgspec.DecodeError:  # a header, an unknown type or a bad line in it
                decoded = None
        if decoded is None:
            for i, line in enumerate(block.split(b"\n")[:-1]):
                self._line(line, first + i)
        else:
            self._add(decoded)

    def _add(self, decoded: list[Any]) -> None:
        """Append the envelopes to the batch in hand, less the duplicates."""
        highest = self._highest
        fresh: list[Any] | None = None  # made only once a duplicate turns up
        bus: str | None = None
        top = -1
        for i, envelope in enumerate(decoded):
            if envelope.bus_id != bus:
                if bus is not None:
                    highest[bus] = top
                bus = envelope.bus_id
                top = highest.get(bus, -1)
            seq = envelope.seq
            if seq > top:
                top = seq
                if fresh is not None:
                    fresh.append(envelope)
            else:
                if fresh is None:
                    fresh = decoded[:i]
                self.duplicates += 1
        if bus is not None:
            highest[bus] = top
        kept = decoded if fresh is None else fresh
        self._batch().envelopes.extend(kept)
        self.events += len(kept)

    def _batch(self) -> LogBatch:
        if not self._ready:
            self._ready.append(LogBatch())
        return self._ready[-1]

    def _last_line(self, data: bytes) -> None:
        """A last line without a newline: read if it is whole JSON, else truncated."""
        self._lines += 1
        if too_deep(data):  # malformed, not merely cut short: no event nests so deep
            self._bad(self._lines, _TOO_DEEP)
            return
        try:
            msgspec.json.decode(data)
        except msgspec.DecodeError:
            self.skipped.append(SkippedLine(self._lines, _TRUNCATED))
            return
        self._line(data, self._lines)

    def _bad(self, lineno: int, reason: str) -> None:
        """A malformed line: raise naming ``file:line`` and the fix, or under
        ``skip_bad`` record it and read on."""
        if not self.skip_bad:
            raise EventDecodeError(
                f"{self.path}:{lineno}: {reason}; --skip-bad (skip_bad=True) skips such "
                "lines and reports them"
            )
        self.skipped.append(SkippedLine(lineno, reason))

    def _line(self, line: bytes, lineno: int) -> None:
        if not line.strip():
            return
        if too_deep(line):
            self._bad(lineno, _TOO_DEEP)
            return
        try:
            envelope: Any = _fast_decoder().decode(line)
        except msgspec.DecodeError:
            envelope = None
        if envelope is None:
            header = self._header(line, lineno)
            if header is not None:
                self.headers += 1
                self._ready.append(LogBatch(header, lineno))
                return
            try:
                envelope = decode_envelope(line, keep_unknown=True)
            except EventDecodeError as exc:
                envelope, error = None, str(exc)
            if envelope is None:  # raised outside the except: no chained context
                self._bad(lineno, error)
                return
        self._add([envelope])

    def _header(self, line: bytes, lineno: int) -> LogHeader | None:
        """The header on this line, ``None`` if it is not one; raises for a header of
        another format or a newer version (those stop a reader, ``skip_bad`` or not)."""
        try:
            data = msgspec.json.decode(line)
        except msgspec.DecodeError:
            return None
        if not isinstance(data, dict) or "format" not in data or "event" in data:
            return None
        where = f"{self.path}:{lineno}"
        try:
            header = msgspec.convert(data, LogHeader)
        except msgspec.ValidationError as exc:
            raise EventDecodeError(f"{where}: malformed header line: {exc}") from None
        if header.format != LOG_FORMAT:
            raise EventDecodeError(
                f"{where}: not an evsys-async event log: its header says format "
                f"{header.format!r}, expected {LOG_FORMAT!r}"
            )
        if header.version > LOG_VERSION:
            raise EventDecodeError(
                f"{where}: the log's format version is {header.version} (written by "
                f"evsys-async {header.evsys_async or '?'}), newer than this evsys-async "
                f"{__version__} reads (up to {LOG_VERSION}); upgrade: pip install -U evsys-async"
            )
        if header.version < 1:
            raise EventDecodeError(
                f"{where}: malformed header line: version {header.version} (versions start at 1)"
            )
        return header

    def __iter__(self) -> Iterator[LogBatch]:
        while (batch := self.read()) is not None:
            yield batch


def read_jsonl(path: str | os.PathLike[str], *, skip_bad: bool = False) -> Iterator[Envelope]:
    """Yield the envelopes of an event log; header lines and blank lines are skipped.

    Raises :class:`EventDecodeError` naming ``file:line`` for a malformed line
    (unless ``skip_bad``), a header of a newer format version or another
    format. A truncated last line is skipped. Events of types not defined here
    come back as :class:`~evsys_async.events.UnknownEvent`.
    """
    reader = EventLogReader(path, skip_bad=skip_bad)
    try:
        for batch in reader:
            yield from batch.as_envelopes()
    finally:
        reader.close()
