"""``tensorboard_logger``: scalars into TensorBoard event files, through tensorboardX.

Train metrics go in per step under their own names; eval metrics under
``val/<key>`` (eval ``val``) or ``val/<eval_name>/<key>`` at the eval's step;
benchmark metrics (through ``dispatch``) under ``eval/<name>/<key>``. One event directory per run:
``state.run_dir / "tensorboard"`` by default, or ``log_dir/<run_key>`` when
``log_dir`` is given and the run has a key (so arms never share a directory).

tensorboardX is the optional extra ``tensorboard``, imported when the callback
is constructed (so a missing extra fails before the run, with the install
command), never by ``import evsys_async``. Every writer call runs in the
callback's own thread (``def`` hooks); the writer opens in ``setup``, is
flushed once per delivered batch and closes in ``teardown``. Rank 0 only.

A resumed run (and the replay of one) writes a new event file into the same
directory, whose purge step hides what the first segment logged from the resume
step on. TensorBoard reads a directory's event files in name order, and
tensorboardX names a file by the wall-clock second it opens in (opening it
with truncation): two segments opened in one second would share a name, and
the second would erase the first. Each file's name therefore ends in a
sequence number within its directory (and the process id), so the files
sort in the order they were written, within one second too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from ..errors import import_extra
from ..state import LoopState
from ._format import eval_metric_name
from ._values import benchmark_metrics, benchmark_name
from .base import Callback
from .registry import register_callback

__all__ = ["TensorBoardLoggerCallback"]


@register_callback("tensorboard_logger")
class TensorBoardLoggerCallback(Callback):
    """Log scalars to TensorBoard. Raises :class:`~evsys_async.MissingExtraError`
    when tensorboardX is not installed."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        log_dir: str | None = None
        flush_secs: int = 30

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, flush_secs: int = 30) -> None:
        self._writer_cls = import_extra(
            "tensorboardX", "tensorboard", "tensorboard_logger"
        ).SummaryWriter
        if flush_secs < 1:
            raise ValueError(f"flush_secs must be >= 1, got {flush_secs}")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.flush_secs = flush_secs
        self.run_log_dir: Path | None = None
        self._writer: Any = None

    def setup(self, state: LoopState) -> None:
        if state.rank != 0:
            return
        if self.log_dir is None:
            path = state.run_dir / "tensorboard"
        else:
            key = state.ctx.run_key
            path = self.log_dir / key if key else self.log_dir
        path.mkdir(parents=True, exist_ok=True)
        self.run_log_dir = path
        # a resume from step k: TensorBoard drops the scalars logged from step k on
        purge = {"purge_step": state.start_step} if state.start_step > 0 else {}
        self._writer = self._writer_cls(
            logdir=str(path),
            flush_secs=self.flush_secs,
            filename_suffix=_next_file_suffix(path),
            **purge,
        )

    def teardown(self, state: LoopState) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: Any, metrics: dict[str, float]
    ) -> None:
        writer = self._writer
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, global_step=step_idx)

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        writer = self._writer
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(eval_metric_name(eval_name, key), value, global_step=step_idx)

    def on_benchmark_eval(
        self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> None:
        writer = self._writer
        if writer is None:
            return
        name = benchmark_name(eval_result)
        for key, value in benchmark_metrics(eval_result).items():
            if isinstance(value, int | float):
                writer.add_scalar(f"eval/{name}/{key}", float(value), global_step=step or 0)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()


def _next_file_suffix(log_dir: Path) -> str:
    """The end of the next event file's name in ``log_dir``: ``.<sequence>.<pid>``.

    tensorboardX names a file ``events.out.tfevents.<second>.<host>`` + this
    suffix, so within one second the sequence (the event files already there,
    zero-padded) orders a resume's file after the first segment's; the process
    id keeps two processes writing one directory from opening the same file.
    """
    earlier = sum(1 for _ in log_dir.glob("events.out.tfevents.*"))
    return f".{earlier:06d}.{os.getpid()}"
