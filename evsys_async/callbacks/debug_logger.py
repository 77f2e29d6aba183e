"""``debug_logger``: every hook and its arguments, summarised.

Pure introspection, no files: drop it into ``callbacks:`` to see which hooks
run, in what order, with what. Each call becomes one record through
structlog on the stdlib logger ``evsys_async`` at DEBUG (``hook=... args``),
or one line on stdout with ``to_stdout=True``. Each value's ``repr`` is cut
to ``max_len`` characters; predictions show their first ``max_pred_rows``
rows. ``on_event`` is overridden too, so custom events, ``StopRequested``,
``EvalFailed`` and ``CallbackFailed`` show up as well. ``def`` hooks: the
formatting happens in the callback's own thread.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import msgspec

from .._util.log import get_logger
from ..events import Event
from ..state import LoopArtifacts, LoopState
from .base import Callback
from .registry import register_callback

__all__ = ["DebugLoggerCallback"]

_log = get_logger()
_stdlib = logging.getLogger("evsys_async")


@register_callback("debug_logger")
class DebugLoggerCallback(Callback):
    """Log every hook call with its arguments (DEBUG, or stdout)."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        max_len: int = 400
        max_pred_rows: int = 3
        to_stdout: bool = False

    def __init__(self, max_len: int = 400, max_pred_rows: int = 3, to_stdout: bool = False) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.max_pred_rows = max(0, max_pred_rows)
        self.to_stdout = to_stdout

    # -- output -------------------------------------------------------------------

    def _short(self, value: Any) -> str:
        text = repr(value)
        if len(text) <= self.max_len:
            return text
        return f"{text[: self.max_len]}… (+{len(text) - self.max_len} chars)"

    def _emit(self, hook: str, **fields: Any) -> None:
        if not self.to_stdout and not _stdlib.isEnabledFor(logging.DEBUG):
            return  # nobody listens: skip the repr work (it is most of the cost)
        short = {k: self._short(v) for k, v in fields.items()}
        if self.to_stdout:
            cells = " ".join(f"{k}={v}" for k, v in short.items())
            sys.stdout.write(f"[debug_logger] {hook} {cells}\n")
        else:
            _log.debug("hook", callback=type(self).__name__, hook=hook, **short)

    def flush(self) -> None:
        if self.to_stdout:
            sys.stdout.flush()

    @staticmethod
    def _state(state: LoopState) -> dict[str, Any]:
        return {
            "step": state.step,
            "num_steps": state.num_steps,
            "run_key": state.ctx.run_key,
            "rank": state.rank,
            "stop_requested": state.stop_requested,
        }

    @staticmethod
    def _ctx(ctx: Any) -> dict[str, Any]:
        return {
            "run_key": getattr(ctx, "run_key", None),
            "group_name": getattr(ctx, "group_name", None),
            "ids": dict(getattr(ctx, "ids", {}) or {}),
            "extras": dict(getattr(ctx, "extras", {}) or {}),
            "output_dir": str(getattr(ctx, "output_dir", "")),
        }

    # -- loop scope ---------------------------------------------------------------

    def on_train_start(self, state: LoopState) -> None:
        self._emit("on_train_start", state=self._state(state))

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: Any, metrics: dict[str, float]
    ) -> None:
        self._emit("on_step_end", step_idx=step_idx, metrics=metrics, batch=type(batch).__name__)

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        self._emit("on_eval", step_idx=step_idx, eval_name=eval_name, metrics=metrics)

    def on_checkpoint(self, state: LoopState, row: dict[str, Any]) -> None:
        self._emit("on_checkpoint", row=row)

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        self._emit(
            "on_train_end",
            status=artifacts.status,
            steps_completed=artifacts.steps_completed,
            total_requested_steps=artifacts.total_requested_steps,
            stop_reason=artifacts.stop_reason,
            train_seconds=round(artifacts.train_seconds, 6),
            error=artifacts.error,
        )

    def on_event(self, state: LoopState, event: Event) -> None:
        self._emit("on_event", event_type=type(event).__name__, payload=msgspec.to_builtins(event))

    # -- experiment scope ---------------------------------------------------------

    def on_experiment_start(self, ctx: Any) -> None:
        self._emit("on_experiment_start", ctx=self._ctx(ctx))

    def on_group_start(self, ctx: Any, group_name: str) -> None:
        self._emit("on_group_start", group_name=group_name, ctx=self._ctx(ctx))

    def on_run_start(self, ctx: Any) -> None:
        self._emit("on_run_start", ctx=self._ctx(ctx), run_config=getattr(ctx, "run_config", None))

    def on_benchmark_eval(
        self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> None:
        rows = list(predictions or ())
        self._emit(
            "on_benchmark_eval",
            step=step,
            eval_result=dict(eval_result) if isinstance(eval_result, Mapping) else eval_result,
            n_predictions=len(rows),
            predictions=rows[: self.max_pred_rows],
            ids=dict(getattr(ctx, "ids", {}) or {}),
        )

    def on_run_end(self, ctx: Any, run_result: Any, arm: Any) -> None:
        self._emit(
            "on_run_end",
            status=getattr(run_result, "status", None),
            metrics=getattr(run_result, "metrics", None),
            arm=getattr(arm, "name", arm),
        )

    def on_experiment_end(self, ctx: Any, result: Any) -> None:
        self._emit(
            "on_experiment_end",
            name=getattr(result, "name", None),
            best_arm=getattr(result, "best_arm", None),
        )
