"""``print_progress``: the original system's one-liner per step, or one live tqdm bar on a TTY.

Output (steps count from 1 here, as everywhere people read them)::

    [1/100] loss=0.6931 lr=1.00e-04
    [10/100] eval val: acc=0.5000

On a stream that is not a TTY (a log file, CI, a pipe) the callback is
``Lossless``: a line for the first step, after every ``every`` steps (steps
``every``, ``2*every``, ... counted from 1: the rule of every cadence) and
for the last step, and every eval result on its own line. On a TTY it draws
one tqdm bar with the same ``k=v`` postfix and subscribes ``Latest``: it
shows the newest step and never lags behind training.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO, Any, ClassVar, Literal

import msgspec

from ..policies import Latest, Lossless, Policy
from ..state import LoopArtifacts, LoopState
from ._format import due, step_of
from ._format import fmt_value as _fmt_value
from .base import Callback
from .registry import register_callback

__all__ = ["PrintProgressCallback"]


def _cells(metrics: Mapping[str, Any], keys: list[str] | None) -> str:
    names = list(metrics) if keys is None else [k for k in keys if k in metrics]
    return " ".join(f"{k}={_fmt_value(metrics[k])}" for k in names)


@register_callback("print_progress")
class PrintProgressCallback(Callback):
    """Progress to ``stream`` (default ``sys.stdout`` at construction).

    ``stream`` may be a text stream (Python) or ``"stdout"``/``"stderr"``
    (configs). Writes happen in the callback's own thread (``def`` hooks),
    so a slow terminal never stalls training. Only rank 0 prints.
    """

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        every: int = 1
        keys: list[str] | None = None
        stream: Literal["stdout", "stderr"] | None = None

    #: the class default; an instance on a TTY picks ``Latest()`` (see ``__init__``)
    policy: ClassVar[Policy] = Lossless()

    def __init__(
        self,
        every: int = 1,
        keys: list[str] | None = None,
        stream: IO[str] | Literal["stdout", "stderr"] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.keys = list(keys) if keys is not None else None
        if stream is None or stream == "stdout":
            self.stream: IO[str] = sys.stdout
        elif stream == "stderr":
            self.stream = sys.stderr
        else:
            self.stream = stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        # the adapter reads the instance attribute: a bar shows the newest step,
        # a log keeps every line
        self.policy = Latest() if self.tty else Lossless()  # type: ignore[misc]
        self._bar: Any = None
        self._printed_first = False
        #: the newest step not printed yet: a run that stops early still shows its last step
        self._unprinted: tuple[int, dict[str, float]] | None = None

    def setup(self, state: LoopState) -> None:
        self._printed_first, self._unprinted = False, None

    # -- hooks (def: they run in the callback's own thread) ----------------------

    def on_train_start(self, state: LoopState) -> None:
        if self.tty and state.rank == 0:
            from tqdm import tqdm

            self._close_bar()
            self._bar = tqdm(
                total=state.num_steps,
                initial=state.start_step,
                file=self.stream,
                dynamic_ncols=True,
            )

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: Any, metrics: dict[str, float]
    ) -> None:
        if state.rank != 0:
            return
        num_steps = state.num_steps
        if self._bar is not None:
            self._bar.n = step_idx + 1
            self._bar.set_postfix_str(_cells(metrics, self.keys), refresh=False)
            self._bar.refresh()
            return
        if self._printed_first and not due(step_idx, self.every) and step_idx + 1 != num_steps:
            self._unprinted = (step_idx, metrics)
            return
        self._printed_first, self._unprinted = True, None
        line = f"{step_of(step_idx, num_steps)} {_cells(metrics, self.keys)}".rstrip()
        self.stream.write(line + "\n")

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        if state.rank != 0:
            return
        line = f"{step_of(step_idx, state.num_steps)} eval {eval_name}: {_cells(metrics, None)}"
        if self._bar is not None:
            self._bar.write(line.rstrip(), file=self.stream)
        else:
            self.stream.write(line.rstrip() + "\n")

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        self._close_bar()
        if self._unprinted is not None and state.rank == 0:  # the last step that ran
            step_idx, metrics = self._unprinted
            line = f"{step_of(step_idx, state.num_steps)} {_cells(metrics, self.keys)}"
            self.stream.write(line.rstrip() + "\n")
            self._unprinted = None
        if artifacts.status != "completed" and state.rank == 0:
            reason = f": {artifacts.stop_reason}" if artifacts.stop_reason else ""
            self.stream.write(
                f"{artifacts.status} after {artifacts.steps_completed} steps{reason}\n"
            )

    def flush(self) -> None:
        self.stream.flush()

    def teardown(self, state: LoopState) -> None:
        self._close_bar()
        self.stream.flush()

    def _close_bar(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()
