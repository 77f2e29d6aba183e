"""``early_stopping``: stop after ``patience`` evals without improvement (the original rule).

On each eval (of ``eval_name``, or of any evaluator when ``None``) that carries
``metric``: the first value sets the best (or is compared with ``baseline``
when one is given); a value that :meth:`is_improvement` over the best becomes
the best and resets the count; otherwise the count grows, and when it reaches
``patience`` the callback calls ``state.request_stop(reason)``. This is the
original system's rule exactly, so it stops at the same eval.

Added to it:

* A metric that never appears is reported: after every evaluator that could
  carry it (``eval_name``'s, or with ``eval_name=None`` each of the run's
  evaluators) has reported once without it, one WARNING names the keys that
  did arrive; with ``strict=True`` the run ends as ``failed`` once each has
  reported twice without it (a typo in ``metric`` would otherwise train to
  the end). An ``eval_name`` that is none of the run's evaluators is a
  WARNING at the start (``strict``: the run fails).
* ``check_finite`` stops at once on NaN or infinity;
  ``min_delta_mode="relative"`` scales ``min_delta`` by ``abs(best)``.
* Stop reasons count steps from 1 and print numbers as the progress line
  does; a ``baseline`` never beaten is said in those words.
* ``state_key`` (``EarlyStoppingCallback(metric='acc', eval_name='val',
  mode='max')`` by default, overridable) keys the saved state on resume, so
  two early-stopping callbacks keep their own counts even when reordered.

``controls_loop = True``: the loop waits for this callback after each eval, so
a stop requested on the eval after step k is honoured before step k+1, as in
the synchronous original. The hook is ``async def`` (pure arithmetic, no
I/O), so the wait costs no thread hop. ``state_dict``/``load_state_dict``
carry the count across a resume.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import msgspec

from .._util.log import get_logger
from ..state import LoopState
from ._format import fmt_value, human_step
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
        state_key: str | None = None

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
        state_key: str | None = None,
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
        self._state_key = state_key
        self._reset()
        self._loaded = False

    def _reset(self) -> None:
        self.best: float | None = self.baseline
        self.best_step: int | None = None
        self.wait = 0
        self.evals_seen = 0
        self.metric_seen = False
        self.stopped_step: int | None = None
        #: evals without the metric, per eval name, and the keys the last one had
        self._lacking: dict[str, int] = {}
        self._lacking_keys: dict[str, list[str]] = {}
        self._warned = False

    @property
    def state_key(self) -> str:
        """The key of this callback's saved state: its class and identifying params."""
        if self._state_key:
            return self._state_key
        return (
            f"{type(self).__name__}(metric={self.metric!r}, eval_name={self.eval_name!r}, "
            f"mode={self.mode!r})"
        )

    # -- the rule ----------------------------------------------------------------

    def is_improvement(self, value: float, best: float) -> bool:
        """True if ``value`` beats ``best`` by more than ``min_delta`` (the original test)."""
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
        known = state.eval_names
        if self.eval_name is not None and known and self.eval_name not in known:
            reason = (
                f"early_stopping: eval_name {self.eval_name!r} is not one of the run's "
                f"evaluators ({', '.join(known)}), so {self.metric!r} is never judged; "
                "check eval_name"
            )
            if self.strict:
                self._stop(state, state.step, reason, failed=True)
            else:
                _log.warning(reason, callback=type(self).__name__)

    async def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        if self.eval_name is not None and eval_name != self.eval_name:
            return
        if self.stopped_step is not None:
            return
        self.evals_seen += 1
        if self.metric not in metrics:
            if not self.metric_seen:
                self._missing(state, step_idx, eval_name, metrics)
            return
        self.metric_seen = True
        value = float(metrics[self.metric])
        if self.check_finite and not math.isfinite(value):
            self._stop(
                state,
                step_idx,
                f"early_stopping: {self.metric} is {value} at step {human_step(step_idx)}",
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
            if self.best_step is None:  # nothing beat the baseline yet
                reason = (
                    f"early_stopping: {self.metric} did not beat the baseline "
                    f"{fmt_value(self.best)} in {self.wait} evals"
                )
            else:
                reason = (
                    f"early_stopping: {self.metric} did not improve for {self.wait} evals "
                    f"(best {fmt_value(self.best)} at step {human_step(self.best_step)})"
                )
            self._stop(state, step_idx, reason)

    def _missing(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """An eval without the metric, before it was ever seen: judge by the evaluators
        that could carry it, not by whichever reports first."""
        self._lacking[eval_name] = self._lacking.get(eval_name, 0) + 1
        self._lacking_keys[eval_name] = sorted(metrics)
        if self.eval_name is not None:
            candidates: tuple[str, ...] = (self.eval_name,)
        else:  # every evaluator of the run (outside a loop: the ones seen so far)
            candidates = state.eval_names or tuple(self._lacking)
        fewest = min(self._lacking.get(name, 0) for name in candidates)
        if len(candidates) == 1:
            arrived = ", ".join(self._lacking_keys.get(candidates[0], [])) or "none"
        else:
            arrived = "; ".join(
                f"{name}: {', '.join(self._lacking_keys[name]) or 'none'}"
                for name in candidates
                if name in self._lacking_keys
            )
        evals = sum(self._lacking.get(name, 0) for name in candidates)
        if self.strict and fewest >= 2:
            self._stop(
                state,
                step_idx,
                f"early_stopping: metric {self.metric!r} never appeared in {evals} evals "
                f"(metrics seen: {arrived}); check `metric`",
                failed=True,
            )
        elif fewest >= 1 and not self._warned:
            self._warned = True
            _log.warning(
                f"early_stopping: metric {self.metric!r} is not among the eval's metrics at "
                f"step {human_step(step_idx)} (metrics seen: {arrived}), so it cannot stop "
                "the run; check `metric` (strict=True makes this an error)",
                callback=type(self).__name__,
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
