"""``local_logger``: the run's own files under ``state.run_dir``.

* ``metrics.jsonl`` — one line per step ``{"split": "train", "step", "ts",
  "metrics"}`` and per eval ``{"split": "val", "eval_name", "step", "ts",
  "metrics"}``;
* ``events.jsonl`` — a header line (:func:`evsys_async.transports.jsonl.log_header`),
  then every event as an envelope ``{"bus_id", "seq", "event"}``, encoded
  with :func:`evsys_async.events.encode`: the input of replay
  (``docs/replay.md``);
* ``predictions/<name>.jsonl`` — the rows of each ``on_benchmark_eval``;
* ``summary.md`` — written at ``on_train_end``: status, steps (of the whole
  run, a resume included), stop reason, checkpoints, what the callback could
  not write, the best value of each eval metric with its step, the last value
  of every metric, the hyperparameters (``TrainStarted.config``) and a chart,
  ``summary.svg`` beside it, of the training loss and each eval metric by
  step (``_picture.py``, ``_chart.py``); both written atomically.

Rows are buffered by the hooks, encoded a batch at a time and written once
per delivered batch (``flush()``) with plain ``def`` writes in the
callback's own thread (faster than async files: ``docs/callbacks.md``),
through a ``RowWriter`` each (``_writer.py``): every line is whole, so the
files parse at any moment; a refused write is held and retried, and what is
lost is reported as ``degraded``. ``log_every=k`` writes a train row to
``metrics.jsonl`` when ``(step + 1) % k == 0`` and for the last step that
ran; eval rows always, and ``events.jsonl`` keeps every event. Files open in
``setup`` and close in ``teardown``; a resumed run (``state.start_step`` k >
0) drops the ``metrics.jsonl`` rows from step k on (they are written again)
and appends; ``events.jsonl`` keeps every event, and a second header line
marks where the resume began. ``print_every`` keeps the original system's
console one-liner (``0`` = silent; lines after every ``print_every`` steps,
counted from 1, and the last); ``keys`` restricts the printed keys (the
files get every key). Rank 0 only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from .._util.files import write_atomic
from .._util.jsonl import encode_json, trim_jsonl
from ..errors import describe
from ..events import Envelope, EvalEnded, StepEnded, TrainStarted, UnknownEvent, encode
from ..state import Degraded, LoopArtifacts, LoopState
from ..transports.jsonl import log_header
from ._format import Cadence, due, step_of
from ._format import fmt_value as _fmt_value
from ._picture import RunPicture
from ._values import DEFAULT_BENCHMARK_NAME, benchmark_name
from ._writer import DEFAULT_MAX_HELD_BYTES, RowWriter, degraded_of
from .base import Callback
from .registry import register_callback

__all__ = ["LocalLoggerCallback"]


class _Row(msgspec.Struct, omit_defaults=True):
    """A metrics.jsonl line: ``eval_name`` only on val rows."""

    split: str
    step: int
    ts: float
    metrics: Mapping[str, float]
    eval_name: str | None = None


#: the codec's encoder (``events.encode``): a batch of envelopes in one call
_lines = msgspec.json.Encoder().encode_lines
_CHART = "summary.svg"


@register_callback("local_logger")
class LocalLoggerCallback(Callback):
    """Write the run's metrics, event log, predictions and summary to local files."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        print_every: int = 1
        keys: list[str] | None = None
        log_every: int = 1

    #: bytes of rows held in memory per file while the disk refuses them
    max_held_bytes: ClassVar[int] = DEFAULT_MAX_HELD_BYTES

    def __init__(
        self, print_every: int = 1, keys: list[str] | None = None, log_every: int = 1
    ) -> None:
        if print_every < 0:
            raise ValueError(f"print_every must be >= 0 (0 = silent), got {print_every}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.print_every = print_every
        self.keys = list(keys) if keys is not None else None
        self.log_every = log_every
        self.run_dir: Path | None = None
        self.picture = RunPicture()
        self._rows: list[_Row] = []
        self._envelopes: list[Envelope] = []
        self._printed: list[str] = []
        self._cadence: Cadence[_Row] = Cadence()
        self._metrics: RowWriter | None = None
        self._events: RowWriter | None = None
        self._summary_trouble: Degraded | None = None
        self._num_steps = 0

    # -- lifecycle ----------------------------------------------------------------

    def setup(self, state: LoopState) -> None:
        self._rows, self._envelopes, self._printed = [], [], []
        self._cadence = Cadence()
        self.picture, self._summary_trouble, self.degraded = RunPicture(), None, None
        self._num_steps = state.num_steps
        if state.rank != 0:
            return
        run_dir = self.run_dir = state.run_dir
        resume = state.start_step > 0
        if resume:
            trim_jsonl(run_dir / "metrics.jsonl", state.start_step)
            self._seed(run_dir / "metrics.jsonl")
        held = self.max_held_bytes
        self._metrics = RowWriter(run_dir / "metrics.jsonl", fresh=not resume, max_held_bytes=held)
        header = log_header(run_key=state.ctx.run_key, start_step=state.start_step) + b"\n"
        self._events = RowWriter(
            run_dir / "events.jsonl", fresh=not resume, head=header, max_held_bytes=held
        )
        self._metrics.open()
        self._events.open()
        self._update_degraded()

    def teardown(self, state: LoopState) -> None:
        self.flush()
        for writer in (self._metrics, self._events):
            if writer is not None:
                writer.close()
        self._update_degraded()
        self._metrics = self._events = None

    # -- loop-scope hooks ---------------------------------------------------------

    def on_envelope(self, state: LoopState, envelope: Envelope) -> None:
        # one hook per event: the metric rows come from the same envelopes as the
        # event log, which halves the per-event hook calls (bench_callbacks.py)
        if self._events is None:
            return
        self._envelopes.append(envelope)
        event = envelope.event
        kind = type(event)
        if kind is StepEnded:
            self._step(event)  # type: ignore[arg-type]
        elif kind is EvalEnded:
            self._eval(event)  # type: ignore[arg-type]
        elif kind is TrainStarted:
            self.picture.started(event.config)  # type: ignore[attr-defined]

    def _step(self, event: StepEnded) -> None:
        step, metrics = event.step, event.metrics
        self.picture.step(step, metrics)
        row = _Row("train", step, event.ts, metrics)
        if self._cadence.take(step, self._num_steps, self.log_every, row):
            self._rows.append(row)
        every, last = self.print_every, step + 1 == self._num_steps
        if every and (due(step, every) or last):
            self._printed.append(f"{step_of(step, self._num_steps)} {self._cells(metrics)}")

    def _eval(self, event: EvalEnded) -> None:
        self.picture.eval(event.step, event.eval_name, event.metrics)
        self._rows.append(_Row("val", event.step, event.ts, event.metrics, event.eval_name))
        if self.print_every:
            cells = self._cells(event.metrics, False)
            where = step_of(event.step, self._num_steps)
            self._printed.append(f"{where} eval {event.eval_name}: {cells}")

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        last = self._cadence.left()
        if last is not None:  # the last step that ran is always a row
            self._rows.append(last)
        if self.run_dir is None:
            return
        steps_done = state.start_step + artifacts.steps_completed
        title = f"{state.ctx.run_key or 'run'}: {steps_done} of {state.num_steps} steps"
        svg = self.picture.svg(title, last_step=steps_done - 1)
        chart = _CHART if svg is not None and self._write(self.run_dir / _CHART, svg) else None
        self._write(self.run_dir / "summary.md", self._summary(state, artifacts, chart))
        self._update_degraded()

    def _write(self, path: Path, text: str) -> bool:
        """Write a whole file atomically; a refusal makes the callback degraded."""
        try:
            write_atomic(path, text, errors="raise")
        except OSError as exc:
            self._summary_trouble = Degraded(f"{path.name} not written: {describe(exc)}")
            return False
        return True

    def flush(self) -> None:
        """Encode what the batch brought and write it: one write per file."""
        if self._rows and self._metrics is not None:
            rows, self._rows = self._rows, []
            self._metrics.write(_encode_rows(rows), lambda: [r.step for r in rows])
        self._rows = []
        if self._envelopes and self._events is not None:
            envs, self._envelopes = self._envelopes, []
            self._events.write(_encode_envelopes(envs), lambda: [_step_of(e) for e in envs])
        self._envelopes = []
        if self._metrics is not None:
            self._update_degraded()
        if self._printed:  # last: a closed stdout fails the hook, never the files
            lines, self._printed = self._printed, []
            out = sys.stdout
            if out is not None:  # None under pythonw or redirect_stdout(None)
                out.write("\n".join(lines) + "\n")
                out.flush()

    def _update_degraded(self) -> None:
        self.degraded = degraded_of([self._metrics, self._events], self._summary_trouble)

    def _seed(self, path: Path) -> None:
        """A resumed run's summary counts the whole run: the rows of the steps before
        the resume, read back (``metrics.jsonl`` is already trimmed to them)."""
        try:
            with open(path, "rb") as f:
                for line in f:
                    row = msgspec.json.decode(line)
                    metrics = {k: float(v) for k, v in row.get("metrics", {}).items()}
                    if row.get("split") == "train":
                        self.picture.step(int(row["step"]), metrics)
                    else:
                        self.picture.eval(int(row["step"]), row.get("eval_name", "val"), metrics)
        except (OSError, ValueError, KeyError, TypeError, msgspec.DecodeError):
            pass  # the summary then shows this segment only; the run goes on

    # -- experiment scope (called through dispatch) --------------------------------

    def on_benchmark_eval(
        self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> None:
        """Append the predictions to ``<run_dir>/predictions/<name>.jsonl`` (one write)."""
        name = benchmark_name(eval_result)
        key = getattr(ctx, "run_key", "") or ""
        run_dir = Path(getattr(ctx, "output_dir", ".")) / key if key else Path(ctx.output_dir)
        out = run_dir / "predictions"
        out.mkdir(parents=True, exist_ok=True)
        rows = list(predictions or ())
        lines = []
        for row in rows:
            record = dict(row) if isinstance(row, Mapping) else {"prediction": row}
            record.setdefault("benchmark", name)
            if step is not None:
                record.setdefault("step", step)
            lines.append(json.dumps(record, default=str))
        if lines:
            with open(out / f"{_safe(name)}.jsonl", "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")

    # -- helpers ------------------------------------------------------------------

    def _cells(self, metrics: Mapping[str, float], filtered: bool = True) -> str:
        keys: Sequence[str] = self.keys if (filtered and self.keys is not None) else list(metrics)
        return " ".join(f"{k}={_fmt_value(metrics[k])}" for k in keys if k in metrics)

    def _summary(self, state: LoopState, artifacts: LoopArtifacts, chart: str | None) -> str:
        steps_done = state.start_step + artifacts.steps_completed
        resumed = f" (resumed at step {state.start_step + 1})" if state.start_step else ""
        lines = [
            f"# {state.ctx.run_key or 'run'}",
            "",
            f"- status: {artifacts.status}",
            f"- steps: {steps_done} of {state.num_steps}{resumed}",
            f"- train seconds: {artifacts.train_seconds:.3f}",
        ]
        if artifacts.stop_reason:
            lines.append(f"- stop reason: {artifacts.stop_reason}")
        if artifacts.error:
            lines.append(f"- error: {artifacts.error}")
        if artifacts.checkpoints:
            names = ", ".join(str(c.get("name")) for c in artifacts.checkpoints)
            lines.append(f"- checkpoints: {names}")
        trouble = degraded_of([self._metrics, self._events])
        if trouble is not None:
            lines.append(f"- degraded: {trouble.reason}")
        lines += self.picture.markdown(chart)
        if artifacts.traceback:  # the failed step's, the user's frames only
            lines += ["", "## Traceback", "", "```text", artifacts.traceback.rstrip(), "```"]
        return "\n".join(lines) + "\n"


def _encode_rows(rows: list[_Row]) -> bytes:
    data: bytes = _lines(rows)
    if b"null" in data:  # msgspec writes NaN and +-inf as null: keep them, line by line
        data = b"\n".join([encode_json(r) for r in rows]) + b"\n"
    return data


def _encode_envelopes(envelopes: list[Envelope]) -> bytes:
    if not any(type(e.event) is UnknownEvent for e in envelopes):
        data: bytes = _lines(envelopes)
        if b"null" not in data:
            return data
    # a null may be NaN, or an unknown event that must be written as it came: the codec
    return b"\n".join([encode(e) for e in envelopes]) + b"\n"


def _step_of(envelope: Envelope) -> int | None:
    step = getattr(envelope.event, "step", None)
    return step if isinstance(step, int) else None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or DEFAULT_BENCHMARK_NAME
