"""``early_stopping``: stop after ``patience`` evals without improvement (the seed's rule).

On each eval (of ``eval_name``, or of any evaluator when ``None``) that carries
``metric``: the first value sets the best (or is compared with ``baseline``
when one is given); a value that :meth:`is_improvement` over the best becomes
the best and resets the count; otherwise the count grows, and when it reaches
``patience`` the callback calls ``state.request_stop(reason)``. This is the
seed's rule exactly, so it stops at the same eval.

Added to the seed: ``check_finite`` stops at once on NaN or infinity;
``strict`` ends the run as ``failed`` when the metric has not been seen by the
second matching eval (a typo in ``metric`` would otherwise train to the end);
``min_delta_mode="relative"`` scales ``min_delta`` by ``abs(best)``.

``controls_loop = True``: the loop waits for this callback after each eval, so
a stop requested on the eval after step k is honoured before step k+1, as in
the synchronous seed. The hook is ``async def`` (pure arithmetic, no I/O), so
the wait costs no thread hop. ``state_dict``/``load_state_dict`` carry the
count across a resume.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import msgspec

from .._log import get_logger
from ..state import LoopState
from .base import Callback
from .registry import register_callback

__all__ = ["EarlyStoppingCallback"]

_log = get_logger()


@register_callback("early_stopping")
class EarlyStoppingCallback(Callback):
    """Request a stop when ``metric`` stops improving. Subclass and override
    :meth:`is_improvement` for another rule."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        metric: str
        eval_name: str | None = None
        patience: int = 3
        mode: Literal["max", "min"] = "max"
        min_delta: float = 0.0
        baseline: float | None = None
        min_delta_mode: Literal["absolute", "relative"] = "absolute"
        check_finite: bool = True
        strict: bool = False

    controls_loop: ClassVar[bool] = True

    def __init__(
        self,
        metric: str,
        eval_name: str | None = None,
        patience: int = 3,
        mode: Literal["max", "min"] = "max",
        min_delta: float = 0.0,
        baseline: float | None = None,
        min_delta_mode: Literal["absolute", "relative"] = "absolute",
        check_finite: bool = True,
        strict: bool = False,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if min_delta_mode not in ("absolute", "relative"):
            raise ValueError(
                f"min_delta_mode must be 'absolute' or 'relative', got {min_delta_mode!r}"
            )
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.metric = metric
        self.eval_name = eval_name
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.baseline = baseline
        self.min_delta_mode = min_delta_mode
        self.check_finite = check_finite
        self.strict = strict
        self._reset()
        self._loaded = False

    def _reset(self) -> None:
        self.best: float | None = self.baseline
        self.best_step: int | None = None
        self.wait = 0
        self.evals_seen = 0
        self.metric_seen = False
        self.stopped_step: int | None = None

    # -- the rule ----------------------------------------------------------------

    def is_improvement(self, value: float, best: float) -> bool:
        """True if ``value`` beats ``best`` by more than ``min_delta`` (the seed's test)."""
        delta = self.min_delta
        if self.min_delta_mode == "relative":
            delta *= abs(best)
        if self.mode == "max":
            return value > best + delta
        return value < best - delta

    # -- hooks -------------------------------------------------------------------

    async def on_train_start(self, state: LoopState) -> None:
        # one instance may see several runs (an experiment's arms): start afresh,
        # unless the loop just loaded this run's saved state (a resume)
        if not self._loaded:
            self._reset()
        self._loaded = False

    async def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        if self.eval_name is not None and eval_name != self.eval_name:
            return
        if self.stopped_step is not None:
            return
        self.evals_seen += 1
        if self.metric not in metrics:
            if self.strict and not self.metric_seen and self.evals_seen >= 2:
                known = ", ".join(sorted(metrics)) or "none"
                self._stop(
                    state,
                    step_idx,
                    f"early_stopping: metric {self.metric!r} never appeared in "
                    f"{self.evals_seen} evals (metrics seen: {known})",
                    failed=True,
                )
            return
        self.metric_seen = True
        value = float(metrics[self.metric])
        if self.check_finite and not math.isfinite(value):
            self._stop(
                state, step_idx, f"early_stopping: {self.metric} is {value} at step {step_idx}"
            )
            return
        if self.best is None:
            self.best, self.best_step = value, step_idx
            return
        if self.is_improvement(value, self.best):
            self.best, self.best_step, self.wait = value, step_idx, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._stop(
                state,
                step_idx,
                f"early_stopping: {self.metric} did not improve for {self.wait} evals "
                f"(best {self.best!r} at step {self.best_step})",
            )

    def _stop(self, state: LoopState, step_idx: int, reason: str, *, failed: bool = False) -> None:
        self.stopped_step = step_idx
        _log.info("early stop requested", callback=type(self).__name__, reason=reason)
        state.request_stop(reason, failed=failed)

    # -- resume ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "evals_seen": self.evals_seen,
            "metric_seen": self.metric_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self.best = state.get("best", self.baseline)
        self.best_step = state.get("best_step")
        self.wait = int(state.get("wait", 0))
        self.evals_seen = int(state.get("evals_seen", 0))
        self.metric_seen = bool(state.get("metric_seen", False))
        self._loaded = True
