"""``local_logger``: the run's own files under ``state.run_dir``.

* ``metrics.jsonl`` — one line per step ``{"split": "train", "step", "ts",
  "metrics"}`` and per eval ``{"split": "val", "eval_name", "step", "ts",
  "metrics"}``;
* ``events.jsonl`` — a header line (:func:`evsys_async.transports.jsonl.log_header`),
  then every event as an envelope ``{"bus_id", "seq", "event"}``, encoded
  with :func:`evsys_async.events.encode`: the input of replay
  (``docs/replay.md``);
* ``predictions/<name>.jsonl`` — the rows of each ``on_benchmark_eval``;
* ``summary.md`` — written at ``on_train_end``: status, steps, stop reason,
  last train metrics and last metrics of each eval.

Writes are buffered and go out once per delivered batch (``flush()``) with
plain ``def`` writes in the callback's own thread (faster than async files:
``docs/callbacks.md``); every line is whole, so the files parse at any
moment. Files open in ``setup`` and close in ``teardown``; a resumed run
(``state.start_step`` k > 0) drops the ``metrics.jsonl`` rows from step k on
(they are written again) and appends; ``events.jsonl`` keeps every event, and
a second header line marks where the resume began. ``print_every`` keeps the
original system's console one-liner (``0`` = silent; lines after every
``print_every`` steps, counted from 1, and the last); ``keys`` restricts the
printed keys (the files get every key). Rank 0 only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import msgspec

from .._util.files import write_atomic
from .._util.jsonl import encode_json, trim_jsonl
from ..events import Envelope, EvalEnded, StepEnded, encode
from ..state import LoopArtifacts, LoopState
from ..transports.jsonl import log_header
from ._format import due, eval_metric_name, human_step
from ._format import fmt_value as _fmt_value
from ._values import DEFAULT_BENCHMARK_NAME, benchmark_name
from .base import Callback
from .registry import register_callback

__all__ = ["LocalLoggerCallback"]


class _Row(msgspec.Struct, omit_defaults=True):
    """A metrics.jsonl line: ``eval_name`` only on val rows."""

    split: str
    step: int
    ts: float
    metrics: dict[str, float]
    eval_name: str | None = None


_encode_row = encode_json  # NaN and +-inf as "nan"/"inf"/"-inf", as in events.jsonl


@register_callback("local_logger")
class LocalLoggerCallback(Callback):
    """Write the run's metrics, event log, predictions and summary to local files."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        print_every: int = 1
        keys: list[str] | None = None

    def __init__(self, print_every: int = 1, keys: list[str] | None = None) -> None:
        if print_every < 0:
            raise ValueError(f"print_every must be >= 0 (0 = silent), got {print_every}")
        self.print_every = print_every
        self.keys = list(keys) if keys is not None else None
        self.run_dir: Path | None = None
        self._metrics: list[bytes] = []
        self._events: list[bytes] = []
        self._printed: list[str] = []
        self._metrics_file: IO[bytes] | None = None
        self._events_file: IO[bytes] | None = None
        self._last_train: tuple[int, dict[str, float]] | None = None
        self._last_evals: dict[str, tuple[int, dict[str, float]]] = {}

    # -- lifecycle ----------------------------------------------------------------

    def setup(self, state: LoopState) -> None:
        self._metrics, self._events, self._printed = [], [], []
        self._last_train, self._last_evals = None, {}
        if state.rank != 0:
            return
        run_dir = state.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        if state.start_step > 0:
            trim_jsonl(run_dir / "metrics.jsonl", state.start_step)
        mode = "ab" if state.start_step > 0 else "wb"
        self._metrics_file = open(run_dir / "metrics.jsonl", mode)  # noqa: SIM115 - closed in teardown
        self._events_file = open(run_dir / "events.jsonl", mode)  # noqa: SIM115
        header = log_header(run_key=state.ctx.run_key, start_step=state.start_step)
        self._events_file.write(header + b"\n")
        self._events_file.flush()

    def teardown(self, state: LoopState) -> None:
        self.flush()
        for f in (self._metrics_file, self._events_file):
            if f is not None:
                f.close()
        self._metrics_file = self._events_file = None

    # -- loop-scope hooks ---------------------------------------------------------

    def on_envelope(self, state: LoopState, envelope: Envelope) -> None:
        # one hook per event: the metric rows come from the same envelopes as the
        # event log, which halves the per-event hook calls (bench_callbacks.py)
        if self._events_file is None:
            return
        self._events.append(encode(envelope))
        event = envelope.event
        if type(event) is StepEnded:
            self._step(state, event)
        elif type(event) is EvalEnded:
            self._eval(state, event)

    def _step(self, state: LoopState, event: StepEnded) -> None:
        step_idx, metrics = event.step, event.metrics
        self._last_train = (step_idx, metrics)
        self._metrics.append(_encode_row(_Row("train", step_idx, event.ts, metrics)))
        every = self.print_every
        if every and (due(step_idx, every) or step_idx + 1 == state.num_steps):
            self._printed.append(f"[{step_idx + 1}/{state.num_steps}] {self._cells(metrics)}")

    def _eval(self, state: LoopState, event: EvalEnded) -> None:
        self._last_evals[event.eval_name] = (event.step, event.metrics)
        row = _Row("val", event.step, event.ts, event.metrics, eval_name=event.eval_name)
        self._metrics.append(_encode_row(row))
        if self.print_every:
            cells = self._cells(event.metrics, False)
            where = f"[{event.step + 1}/{state.num_steps}]"
            self._printed.append(f"{where} eval {event.eval_name}: {cells}")

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        if self.run_dir is None:
            return
        write_atomic(self.run_dir / "summary.md", self._summary(state, artifacts), errors="raise")

    def flush(self) -> None:
        """Write what the batch buffered: one write per file."""
        if self._metrics and self._metrics_file is not None:
            self._metrics_file.write(b"\n".join(self._metrics) + b"\n")
            self._metrics_file.flush()
        self._metrics = []
        if self._events and self._events_file is not None:
            self._events_file.write(b"\n".join(self._events) + b"\n")
            self._events_file.flush()
        self._events = []
        if self._printed:
            sys.stdout.write("\n".join(self._printed) + "\n")
            sys.stdout.flush()
            self._printed = []

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

    def _summary(self, state: LoopState, artifacts: LoopArtifacts) -> str:
        lines = [
            f"# {state.ctx.run_key or 'run'}",
            "",
            f"- status: {artifacts.status}",
            f"- steps: {artifacts.steps_completed} of {state.num_steps}",
            f"- train seconds: {artifacts.train_seconds:.3f}",
        ]
        if artifacts.stop_reason:
            lines.append(f"- stop reason: {artifacts.stop_reason}")
        if artifacts.error:
            lines.append(f"- error: {artifacts.error}")
        if artifacts.checkpoints:
            names = ", ".join(str(c.get("name")) for c in artifacts.checkpoints)
            lines.append(f"- checkpoints: {names}")
        # the last value of each metric, named as in metrics.csv; steps count from 1
        table: list[tuple[str, int, float]] = []
        if self._last_train is not None:
            step, metrics = self._last_train
            table += [(k, step, v) for k, v in metrics.items()]
        for eval_name, (step, metrics) in sorted(self._last_evals.items()):
            table += [(eval_metric_name(eval_name, k), step, v) for k, v in metrics.items()]
        if table:
            lines += ["", "| metric | step | last value |", "|---|---|---|"]
            lines += [f"| {k} | {human_step(st)} | {_fmt_value(v)} |" for k, st, v in table]
        if artifacts.traceback:  # the failed step's, the user's frames only
            lines += ["", "## Traceback", "", "```text", artifacts.traceback.rstrip(), "```"]
        return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or DEFAULT_BENCHMARK_NAME
