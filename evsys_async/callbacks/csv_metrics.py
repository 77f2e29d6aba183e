"""``csv_metrics``: one CSV row per step, valid for ``csv``/pandas at any moment.

Layout: the first column is ``step`` (0-based); then every train metric key,
in order of first appearance; eval metrics go in columns named as everywhere
else (``val/<key>`` for the eval named ``val``, ``val/<eval_name>/<key>`` for
any other) in a row of their own (same ``step``, train cells empty), so a
train row is never rewritten and ``df[df["val/acc"].notna()]`` selects the
evals.
Values are written at full precision (``repr`` of the float); a missing
value is an empty cell.

The original system appended new keys as columns without touching the header, which
pandas misreads. Here, when a key first appears mid-run, the file is
rewritten once with the wider header (old rows padded with empty cells),
atomically (``_util/files.py``'s ``atomic_writer``: a temporary file beside it, ``fsync``,
``os.replace``): a reader sees the old file or the new one, never a mix.
Rows are buffered and written once per delivered batch (``flush()``), in the
callback's own thread.
A resumed run (``state.start_step`` k > 0) keeps the existing file's header
and its rows before step k, drops the rows from step k on (they are written
again, so no step appears twice) and appends. Rank 0 only.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import IO, Any

import msgspec

from .._util.files import atomic_writer
from ..state import LoopState
from ._format import eval_metric_name
from .base import Callback
from .registry import register_callback

__all__ = ["CsvMetricsCallback"]


@register_callback("csv_metrics")
class CsvMetricsCallback(Callback):
    """Mirror step and eval metrics into ``out_path`` (relative paths: under ``state.run_dir``)."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        out_path: str
        delimiter: str = ","

    def __init__(self, out_path: str | os.PathLike[str], delimiter: str = ",") -> None:
        if len(delimiter) != 1:
            raise ValueError(f"delimiter must be one character, got {delimiter!r}")
        self.out_path = Path(out_path)
        self.delimiter = delimiter
        self.path: Path | None = None
        self.columns: list[str] = ["step"]
        self._known: set[str] = {"step"}
        self._rows: list[dict[str, Any]] = []
        self._file: IO[str] | None = None

    # -- lifecycle (the callback's own thread) ----------------------------------

    def setup(self, state: LoopState) -> None:
        self.columns, self._known, self._rows = ["step"], {"step"}, []
        if state.rank != 0:
            return
        path = self.out_path if self.out_path.is_absolute() else state.run_dir / self.out_path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if state.start_step > 0 and path.exists() and path.stat().st_size > 0:
            header = self._keep_rows_before(path, state.start_step)
            self.columns, self._known = list(header), set(header)
            self._file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        else:
            self._file = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115
            self._write_rows(self._file, [], header=True)

    def teardown(self, state: LoopState) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- hooks -------------------------------------------------------------------

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: Any, metrics: dict[str, float]
    ) -> None:
        if self._file is not None:
            self._rows.append({"step": step_idx, **metrics})

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        if self._file is not None:
            row: dict[str, Any] = {"step": step_idx}
            for key, value in metrics.items():
                row[eval_metric_name(eval_name, key)] = value
            self._rows.append(row)

    def flush(self) -> None:
        """Write the batch's rows: one append, or one atomic rewrite when keys are new."""
        rows, self._rows = self._rows, []
        if not rows or self._file is None:
            return
        new = [k for row in rows for k in row if k not in self._known]
        if new:
            for key in new:
                if key not in self._known:
                    self._known.add(key)
                    self.columns.append(key)
            self._rewrite(rows)
        else:
            self._write_rows(self._file, rows)
            self._file.flush()

    # -- writing -----------------------------------------------------------------

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

    def _write_rows(self, f: IO[str], rows: list[dict[str, Any]], *, header: bool = False) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=self.delimiter, lineterminator="\n")
        if header:
            writer.writerow(self.columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in self.columns])
        f.write(buf.getvalue())  # one write per batch: a reader sees whole lines

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        assert self.path is not None
        assert self._file is not None
        self._file.close()
        path = self.path
        with (
            open(path, newline="", encoding="utf-8") as old,
            atomic_writer(path, newline="") as new,
        ):
            reader = csv.reader(old, delimiter=self.delimiter)
            previous = next(reader, [])
            self._write_rows(new, [], header=True)
            writer = csv.writer(new, delimiter=self.delimiter, lineterminator="\n")
            pad = len(self.columns)
            index = {c: i for i, c in enumerate(self.columns)}
            for line in reader:
                out = [""] * pad
                for name, cell in zip(previous, line, strict=False):
                    out[index[name]] = cell
                writer.writerow(out)
            self._write_rows(new, rows)
        self._file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: float(repr(x)) == x
    return str(value)
