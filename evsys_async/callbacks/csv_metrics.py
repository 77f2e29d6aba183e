"""``csv_metrics``: one CSV row per logged step, valid for ``csv``/pandas at any moment.

Layout: the first column is ``step`` (0-based); then every train metric key,
in order of first appearance; eval metrics go in columns named as everywhere
else (``val/<key>`` for the eval named ``val``, ``val/<eval_name>/<key>`` for
any other) in a row of their own (same ``step``, train cells empty), so a
train row is never rewritten and ``df[df["val/acc"].notna()]`` selects the
evals. Values are written at full precision (the shortest text that reads
back as the same float); a missing value is an empty cell.

Cadence: with ``log_every=k`` a train row is written when ``(step + 1) % k
== 0`` and for the last step that ran (at the end, for a run that stopped
early); eval rows always.

The header is on disk when ``setup`` returns, so a reader never finds an
empty file. The original system appended new keys as columns without
touching the header, which pandas misreads. Here, when a key first appears
mid-run, the file is rewritten once with the wider header (old rows padded
with empty cells), atomically: a reader sees the old file or the new one,
never a mix. Rows are buffered by the hooks and formatted and written once
per delivered batch (``flush()``), in the callback's own thread, through a
``RowWriter`` (``_writer.py``): a row is on disk whole or not at all; rows a
full disk refuses are held and written in order when it takes them again,
and past the bound the callback is ``degraded`` with the rows lost.

A resumed run (``state.start_step`` k > 0) keeps the existing file's header
and its rows before step k, drops the rows from step k on (they are written
again, so no step appears twice) and appends. Rank 0 only.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from operator import itemgetter
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from .._util.files import atomic_writer
from .._util.paths import expand_path
from .._util.rundir import check_inside, logger_path
from ..state import LoopArtifacts, LoopState
from ._format import Cadence, eval_metric_name
from ._writer import DEFAULT_MAX_HELD_BYTES, RowWriter
from .base import Callback
from .registry import register_callback

__all__ = ["CsvMetricsCallback"]

_encode = msgspec.json.Encoder().encode
#: delimiters that never occur in a number's JSON text: rows are built from it
_UNSAFE = set('0123456789.+-eE"[]\\\r\n')

Row = tuple[int, Mapping[str, Any]]


@register_callback("csv_metrics")
class CsvMetricsCallback(Callback):
    """Mirror step and eval metrics into ``out_path`` (``~`` and ``$VAR`` expanded;
    a relative path is under ``state.run_dir``)."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        out_path: str
        delimiter: str = ","
        log_every: int = 1

    #: bytes of rows held in memory while the disk refuses them, before it gives up
    max_held_bytes: ClassVar[int] = DEFAULT_MAX_HELD_BYTES

    def __init__(
        self, out_path: str | os.PathLike[str], delimiter: str = ",", log_every: int = 1
    ) -> None:
        if len(delimiter) != 1:
            raise ValueError(f"delimiter must be one character, got {delimiter!r}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        what = "csv_metrics out_path"
        self.out_path = check_inside(expand_path(out_path, what=what), what=what)
        self.delimiter = delimiter
        self.log_every = log_every
        self.path: Path | None = None
        self.columns: list[str] = ["step"]
        self._known: set[str] = {"step"}
        self._rows: list[Row] = []
        self._cadence: Cadence[Row] = Cadence()
        self._writer: RowWriter | None = None
        self._num_steps = 0
        self._fast = delimiter not in _UNSAFE

    # -- lifecycle (the callback's own thread) ----------------------------------

    def setup(self, state: LoopState) -> None:
        self.columns, self._known, self._rows = ["step"], {"step"}, []
        self._cadence = Cadence()
        self.degraded = None
        self._num_steps = state.num_steps
        if state.rank != 0:
            return
        path = logger_path(self.out_path, state.run_dir, what="csv_metrics out_path")
        self.path = path
        if state.start_step > 0 and path.exists() and path.stat().st_size > 0:
            header = self._keep_rows_before(path, state.start_step)
            self.columns, self._known = list(header), set(header)
            self._writer = RowWriter(path, fresh=False, max_held_bytes=self.max_held_bytes)
        else:
            head = self._header()
            self._writer = RowWriter(path, head=head, max_held_bytes=self.max_held_bytes)
        self._writer.open()  # the header is on disk now, not at the first flush
        self.degraded = self._writer.degraded

    def teardown(self, state: LoopState) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self.degraded = self._writer.degraded
            self._writer = None

    # -- hooks -------------------------------------------------------------------

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: Any, metrics: dict[str, float]
    ) -> None:
        if self._writer is None:
            return
        row = (step_idx, metrics)
        if self._cadence.take(step_idx, self._num_steps, self.log_every, row):
            self._rows.append(row)

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        if self._writer is not None:
            named = {eval_metric_name(eval_name, k): v for k, v in metrics.items()}
            self._rows.append((step_idx, named))

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        last = self._cadence.left()
        if last is not None:  # the last step that ran is always a row
            self._rows.append(last)

    def flush(self) -> None:
        """Format the batch's rows and write them: one append, or one atomic rewrite
        when keys are new."""
        rows, self._rows = self._rows, []
        writer = self._writer
        if not rows or writer is None:
            return
        known, wider = self._known, False
        for _, metrics in rows:
            if not known.issuperset(metrics):
                for key in metrics:
                    if key not in known:
                        known.add(key)
                        self.columns.append(key)
                        wider = True
        data = self._format(rows)
        steps = lambda: [step for step, _ in rows]  # noqa: E731 - asked only on trouble
        if wider:
            writer.rewrite(self._header(), self._pad, data, steps)
        else:
            writer.write(data, steps)
        self.degraded = writer.degraded

    # -- formatting --------------------------------------------------------------

    def _header(self) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, delimiter=self.delimiter, lineterminator="\n").writerow(self.columns)
        return buf.getvalue().encode("utf-8")

    def _format(self, rows: list[Row]) -> bytes:
        """The rows as CSV lines: msgspec writes the numbers of the whole batch in one
        call (shortest round-trip text); NaN, infinities, text cells or an unusual
        delimiter take the csv module's path."""
        cols = self.columns[1:]
        if self._fast:
            width = len(cols)
            get = itemgetter(*cols) if width > 1 else None
            table: list[Any] = []
            for step, m in rows:
                if get is not None and len(m) == width:
                    table.append((step, *get(m)))
                else:
                    table.append((step, *[m.get(c, "") for c in cols]))
            text = _encode(table)
            if b"null" not in text:
                body = text[2:-2].replace(b"],[", b"\n").replace(b'""', b"")
                if b'"' not in body and b"true" not in body and b"false" not in body:
                    if self.delimiter != ",":
                        body = body.replace(b",", self.delimiter.encode())
                    return body + b"\n"
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=self.delimiter, lineterminator="\n")
        writer.writerows([step, *[_cell(m.get(c)) for c in cols]] for step, m in rows)
        return buf.getvalue().encode("utf-8")

    def _pad(self, line: bytes) -> bytes:
        """A row written under a narrower header, as wide as the header now."""
        body = line.rstrip(b"\r\n")
        width = len(self.columns)
        if b'"' in body:
            (cells,) = csv.reader([body.decode("utf-8")], delimiter=self.delimiter)
            cells += [""] * (width - len(cells))
            buf = io.StringIO()
            csv.writer(buf, delimiter=self.delimiter, lineterminator="\n").writerow(cells)
            return buf.getvalue().encode("utf-8")
        delim = self.delimiter.encode()
        return body + delim * (width - body.count(delim) - 1) + b"\n"

    def _keep_rows_before(self, path: Path, start_step: int) -> list[str]:
        """Rewrite ``path`` (atomically) without its rows from ``start_step`` on; the header."""
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            header = next(reader, ["step"])
            rows = [r for r in reader if not (r and r[0].isdigit() and int(r[0]) >= start_step)]
        with atomic_writer(path, newline="") as f:
            writer = csv.writer(f, delimiter=self.delimiter, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        return header


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: float(repr(x)) == x
    return str(value)
