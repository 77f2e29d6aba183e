"""``RowWriter``: the built-ins' appending files, where nothing is lost without a word.

Every file a built-in grows row by row (``metrics.csv``, ``metrics.jsonl``,
``events.jsonl``, the store's row files) goes through one :class:`RowWriter`,
which promises:

* **Whole rows or none.** A batch is one ``os.write`` (more only after a
  short write). When a write fails part-way (a full disk, an I/O error), the
  file is truncated back to the end of its last whole row: a reader never
  sees a torn row.
* **Held, then written in order.** Rows the disk refused are held in memory,
  up to ``max_held_bytes``, and written before anything newer at the next
  write, so when space comes back the file has every row, in order, and the
  episode costs nothing but a WARNING.
* **No silent gap.** Past the bound the writer stops for good: it never
  appends after a gap. Its :attr:`degraded` then says why, how many rows are
  lost and from which step the file lacks them; rows still held when the
  writer closes are lost the same way. A file removed under the writer (its
  directory deleted) is found at the next check (at most every
  ``CHECK_SECONDS``, and at close) and reported lost whole.
* A file that cannot be opened (a read-only or vanished directory) is
  treated like a refused write: its rows are held and the open is retried.

A callback calls :func:`degraded_of` over its writers after each flush and
sets ``callback.degraded`` (``state.Degraded``), which the run's report, the
manifest and the summaries read. Not thread-safe: one callback's thread owns
a writer. Every method blocks on file I/O and never raises ``OSError``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .._util.files import atomic_writer
from .._util.log import get_logger
from ..errors import describe
from ..state import Degraded

__all__ = ["CHECK_SECONDS", "DEFAULT_MAX_HELD_BYTES", "RowWriter", "degraded_of", "os_write"]

_log = get_logger()

#: what a writer holds for a retry before it gives up (rows are ~50-200 bytes)
DEFAULT_MAX_HELD_BYTES = 8 << 20
#: how often a writer checks that its file is still there (an ``fstat``)
CHECK_SECONDS = 1.0

#: the one call that writes: a seam for tests that cannot mount a small filesystem
#: (they replace it with one that refuses, as a full disk does)
os_write: Callable[[int, bytes], int] = os.write

#: the steps of a batch's rows, asked for only when some of them are held or lost
Steps = Callable[[], Sequence[int | None]]


class RowWriter:
    """Rows appended to ``path`` (see the module docstring).

    ``head`` is written first when the file is opened (a CSV header, a log's
    header line); ``fresh=True`` starts the file empty, ``False`` appends to
    what is there (a resume). Rows are ``bytes`` lines, each ending in
    ``b"\\n"``, handed over a batch at a time.
    """

    def __init__(
        self,
        path: Path,
        *,
        fresh: bool = True,
        head: bytes = b"",
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
    ) -> None:
        self.path = path
        #: the file's first line, which a :meth:`rewrite` replaces
        self.head = head
        self.max_held_bytes = max_held_bytes
        self._open_head = head  # written when the file is opened (fresh, or a resume's log)
        self._fresh = fresh
        self._fd: int | None = None
        self._held: list[tuple[bytes, list[int | None]]] = []
        self._held_bytes = 0
        #: a rewrite that must happen before anything is appended: how it fixes a row
        self._stale: Callable[[bytes], bytes] | None = None
        self._error: str | None = None
        self._stopped = False
        self._lost = 0
        self._missing_from: int | None = None
        self._first_step: int | None = None
        self._rows = 0
        self._checked = time.monotonic()

    # -- what the callback reads -------------------------------------------------

    @property
    def degraded(self) -> Degraded | None:
        """``None`` while every row is on disk; else why not, and what is lost."""
        if self._stopped:
            reason = f"{self.path.name}: {self._error}"
            return Degraded(reason, rows_lost=self._lost, missing_from_step=self._missing_from)
        if self._held or self._stale is not None:
            rows = sum(len(steps) for _, steps in self._held)
            return Degraded(f"{self.path.name}: {self._error}; {rows} rows held for a retry")
        return None

    # -- writing -----------------------------------------------------------------

    def open(self) -> bool:
        """Open the file and write the head; ``False`` if it could not be (the reason
        is kept, and the open is retried at the next write)."""
        if self._fd is not None or self._stopped:
            return self._fd is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if self._fresh else 0)
            self._fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            self._refused(exc)
            return False
        if self._open_head:
            _, refused = self._append(self._open_head)
            if refused is not None:  # no head, no file: opened again later
                self._close_fd()
                self._refused(refused)
                return False
        # opened again (after a rewrite, or a refused open) it keeps what it has
        self._fresh, self._open_head = False, b""
        return True

    def write(self, data: bytes, steps: Steps) -> None:
        """Append ``data`` (whole lines); ``steps()`` gives each line's step and is
        called only when some lines cannot be written now."""
        if not data:
            return
        if self._stopped:
            self._lose(data.count(b"\n"), steps)
            return
        if self._first_step is None:
            first = steps()
            self._first_step = first[0] if first else None
        if self._held or self._stale is not None or self._fd is None:
            self._hold(data, list(steps()), check=False)
            self._retry()
        elif self._gone():
            self._lose(data.count(b"\n"), steps)
        else:
            self._put(data, steps)

    def rewrite(
        self, head: bytes, fix: Callable[[bytes], bytes], data: bytes, steps: Steps
    ) -> None:
        """Replace the file by ``head``, every row it holds and every held row passed
        through ``fix`` (one line in, one line out), then ``data``: atomically, so a
        reader sees the old file or the new one. Refused, it is retried before any
        later append."""
        self.head = head
        if self._stopped:
            self._lose(data.count(b"\n"), steps)
            return
        self._held = [(_fix_lines(chunk, fix), s) for chunk, s in self._held]
        self._held_bytes = sum(len(chunk) for chunk, _ in self._held)
        self._stale = fix
        self._hold(data, list(steps()) if data else [], check=False)
        self._retry()

    def close(self) -> None:
        """Write what is held if the disk takes it, then close; what is still held is
        lost (counted, with the first missing step)."""
        self._retry()
        if not self._stopped and not self._gone(force=True) and self._held:
            self._stop()
        self._close_fd()

    # -- internals ---------------------------------------------------------------

    def _append(self, data: bytes) -> tuple[int, OSError | None]:
        """Write ``data``; the bytes of whole rows now on disk, and the error that
        stopped the rest (a torn row is cut off the end first)."""
        assert self._fd is not None
        done = 0
        try:
            while done < len(data):
                n = os_write(self._fd, data[done:] if done else data)
                if n <= 0:
                    raise OSError("the file took no bytes")
                done += n
        except OSError as exc:
            cut = data.rfind(b"\n", 0, done) + 1
            if done > cut:
                self._truncate(done - cut)
            return cut, exc
        return done, None

    def _put(self, data: bytes, steps: Steps) -> bool:
        """One append; what the disk refused is held. ``True`` when all is on disk."""
        cut, exc = self._append(data)
        rows_in = data.count(b"\n", 0, cut)
        self._rows += rows_in
        if exc is None:
            return True
        self._refused(exc)
        self._hold(data[cut:], list(steps())[rows_in:])
        return False

    def _truncate(self, torn: int) -> None:
        """Cut ``torn`` bytes off the end; a file that cannot be cut is given up."""
        assert self._fd is not None
        try:
            end = os.lseek(self._fd, 0, os.SEEK_END)
            os.ftruncate(self._fd, end - torn)
        except OSError as exc:
            self._error = f"could not cut a torn row off the end: {describe(exc)}"
            self._stop()

    def _retry(self) -> None:
        """Write what is held (the rewrite first, if one is due), oldest first."""
        if self._stopped or not (self._held or self._stale is not None):
            return
        if (self._fd is None and not self.open()) or (
            self._stale is not None and not self._replace()
        ):
            self._check_bound()
            return
        held, self._held, self._held_bytes = self._held, [], 0
        for i, (chunk, steps) in enumerate(held):
            if not self._put(chunk, lambda s=steps: s):  # type: ignore[misc]
                for rest in held[i + 1 :]:
                    self._hold(*rest)
                return
        if self._error is not None:
            _log.warning("the disk takes rows again: every held row written", path=str(self.path))
            self._error = None

    def _replace(self) -> bool:
        """The rewrite :meth:`rewrite` asked for; ``False`` if the disk refused it."""
        fix = self._stale
        assert fix is not None
        try:
            with open(self.path, "rb") as old, atomic_writer(self.path, "wb") as new:
                old.readline()  # the old head
                new.write(self.head)
                for line in old:
                    new.write(fix(line))
                for chunk, _ in self._held:
                    new.write(chunk)
        except OSError as exc:
            self._refused(exc)
            return False
        self._rows += sum(len(s) for _, s in self._held)
        self._held, self._held_bytes, self._stale = [], 0, None
        self._close_fd()  # the old file's: appends go to the new one
        return self.open()

    def _hold(self, data: bytes, steps: list[int | None], *, check: bool = True) -> None:
        """Keep rows for a retry; ``check=False`` for rows about to be tried at once
        (the bound is checked if that fails)."""
        if not data:
            return
        if self._stopped:
            self._lose(len(steps), lambda: steps)
            return
        self._held.append((data, steps))
        self._held_bytes += len(data)
        if check:
            self._check_bound()

    def _check_bound(self) -> None:
        if self._held_bytes > self.max_held_bytes and not self._stopped:
            self._error = (
                f"{self._error}; more than {self.max_held_bytes} bytes of rows held, "
                "so the writer stopped (it never appends after a gap)"
            )
            self._stop()

    def _refused(self, exc: OSError) -> None:
        first = self._error is None
        self._error = describe(exc)
        if first:
            _log.warning(
                "could not write; rows are held and written when the disk takes them",
                path=str(self.path),
                error=self._error,
            )

    def _stop(self) -> None:
        """Give up: everything held is lost, and so is every later row."""
        self._stopped = True
        held, self._held, self._held_bytes = self._held, [], 0
        for _, steps in held:
            self._lose(len(steps), lambda s=steps: s)  # type: ignore[misc]
        _log.warning(
            "stopped writing: the file lacks rows",
            path=str(self.path),
            rows_lost=self._lost,
            from_step=self._missing_from,
            error=self._error,
        )

    def _lose(self, count: int, steps: Steps) -> None:
        if count and self._missing_from is None:
            known = [s for s in steps() if s is not None]
            self._missing_from = known[0] if known else None
        self._lost += count

    def _gone(self, *, force: bool = False) -> bool:
        """True (and the writer stopped) when the file was removed under it."""
        now = time.monotonic()
        if self._fd is None or (not force and now - self._checked < CHECK_SECONDS):
            return False
        self._checked = now
        try:
            removed = os.fstat(self._fd).st_nlink == 0
        except OSError:
            removed = True
        if not removed:
            return False
        self._error = "the file was removed during the run"
        self._missing_from, self._lost = self._first_step, self._rows
        self._stop()
        return True

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                _log.warning("could not close file", path=str(self.path), error=describe(exc))


def _fix_lines(chunk: bytes, fix: Callable[[bytes], bytes]) -> bytes:
    return b"".join(fix(line) for line in chunk.splitlines(keepends=True))


def degraded_of(writers: Sequence[RowWriter | None], *also: Degraded | None) -> Degraded | None:
    """One :class:`~evsys_async.state.Degraded` for a callback's writers (and any
    other trouble it had): reasons joined, rows lost summed, the earliest missing
    step; ``None`` when every writer is whole."""
    found = [w.degraded for w in writers if w is not None] + list(also)
    parts = [d for d in found if d is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    missing = [d.missing_from_step for d in parts if d.missing_from_step is not None]
    return Degraded(
        "; ".join(d.reason for d in parts),
        rows_lost=sum(d.rows_lost for d in parts),
        missing_from_step=min(missing) if missing else None,
    )
