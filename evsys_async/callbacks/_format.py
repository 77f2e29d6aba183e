"""How the built-ins and the command line name and print things, in one place.

* Numbers print as the progress line prints them (:func:`fmt_value`: the
  original system's ``_fmt_value``).
* An eval metric is named :func:`eval_metric_name`: ``val/<key>`` for the
  default eval name ``val``, ``val/<eval_name>/<key>`` for any other — the
  same in ``metrics.csv``, TensorBoard, W&B, ``summary.md`` and the CLI.
* Steps: every machine-readable ``step`` is 0-based (the step's index);
  every text meant for people counts from 1 (:func:`human_step`), as
  ``[step_idx+1/num_steps]`` does.
* Cadences (``every``, ``log_every``, ``run_every``, ``save_every``): fire
  after step ``i`` when ``(i + 1) % k == 0`` (:func:`due`); a logger's
  ``log_every`` also logs the last step that ran (:class:`Cadence`).
"""

from __future__ import annotations

import math
from typing import Any, Generic, TypeVar

__all__ = [
    "DEFAULT_EVAL_NAME",
    "Cadence",
    "due",
    "eval_metric_name",
    "fmt_value",
    "human_step",
    "step_of",
]

T = TypeVar("T")

#: the eval name that gets no segment of its own in metric names
DEFAULT_EVAL_NAME = "val"


def fmt_value(value: Any) -> str:
    """``.4f``; ``.2e`` for a nonzero magnitude below 1e-3 or from 1e6; non-numbers as str."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    v = float(value)
    if math.isinf(v) or (v != 0.0 and (abs(v) < 1e-3 or abs(v) >= 1e6)):
        return f"{v:.2e}"
    return f"{v:.4f}"


def eval_metric_name(eval_name: str, key: str) -> str:
    """``val/acc`` for the eval named ``val``; ``val/remote/acc`` for ``remote``."""
    if eval_name == DEFAULT_EVAL_NAME:
        return f"{DEFAULT_EVAL_NAME}/{key}"
    return f"{DEFAULT_EVAL_NAME}/{eval_name}/{key}"


def human_step(step_idx: int | None) -> str:
    """The step as people count it: index 0 is step 1."""
    return "?" if step_idx is None else str(step_idx + 1)


def step_of(step_idx: int, num_steps: int) -> str:
    """A progress line's ``[step/steps]``; ``[step]`` when the number of steps is not
    known (0: a session over a trainer that does not say)."""
    return f"[{step_idx + 1}/{num_steps}]" if num_steps > 0 else f"[{step_idx + 1}]"


def due(step_idx: int, every: int) -> bool:
    """True after step ``step_idx`` for a cadence of ``every`` steps (0 = never)."""
    return every > 0 and (step_idx + 1) % every == 0


class Cadence(Generic[T]):
    """A logger's ``log_every``: a train row is written when the step is due or the
    run's last; one that is not is held, so the last step that ran is written at the
    end whatever the cadence (:meth:`left`, at the run's end or teardown). What is
    held is the logger's own (an event, a row)."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: T | None = None

    def take(self, step_idx: int, num_steps: int, every: int, row: T) -> bool:
        """True: write ``row`` now. False: it is held (replacing the one held)."""
        if every == 1 or due(step_idx, every) or step_idx + 1 >= num_steps:
            self._held = None
            return True
        self._held = row
        return False

    def left(self) -> T | None:
        """The row held back, once (then ``None``): the last step's, if unwritten."""
        held, self._held = self._held, None
        return held
