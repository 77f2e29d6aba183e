"""What a run shares with its callbacks: LoopState, LogContext, StepOutput, LoopArtifacts,
and the experiment's records the experiment-scope hooks get (Arm, RunResult,
ArmResult, ExperimentResult).

This module exists so that the loop, the experiment and ``callbacks/base.py``
do not import each other: it sits below all three. ``LoopState`` is live:
hooks get the object itself, so ``state.request_stop()`` works from any hook,
in any thread. The experiment's records are plain data; ``evsys_async.experiment``
re-exports them, their public path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import msgspec

from .bus.subscription import current_subscription
from .events import Event

__all__ = [
    "Arm",
    "ArmResult",
    "CallbackHealth",
    "Degraded",
    "EvalTally",
    "ExperimentResult",
    "LogContext",
    "LoopArtifacts",
    "LoopState",
    "RunResult",
    "Status",
    "StepOutput",
]

#: How a run stands: ``running`` until it ends, then how it ended. A ``Literal``
#: of plain strings, so ``artifacts.status == "completed"`` reads as it should.
Status: TypeAlias = Literal["running", "completed", "stopped", "failed", "cancelled"]


@dataclass
class LogContext:
    """Shared context of a run or an experiment (the original system's fields).

    ``ids`` and ``extras`` are free-form: callbacks write there (a wandb URL,
    a store id) for the callbacks after them and for the caller.
    """

    output_dir: Path | str = "runs"
    config: dict[str, Any] = field(default_factory=dict)
    store: Any = None
    run_key: str = ""
    run_config: dict[str, Any] = field(default_factory=dict)
    group_name: str | None = None
    ids: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutput:
    """What a step may return: its metrics and, optionally, the batch (live, in-process)."""

    metrics: Mapping[str, Any]
    batch: Any = None


class Degraded(msgspec.Struct, frozen=True):
    """Why a callback's output is incomplete although it kept running.

    A built-in writer that could not write (a full or read-only disk, a
    vanished directory, an unreachable tracking server) sets one on itself as
    ``callback.degraded``; the run's report, ``manifest.json`` (its
    ``degraded`` list) and the summaries carry it, so lost data is never
    reported "ok". ``rows_lost`` counts what will never reach the file or
    service; ``missing_from_step`` is the first step whose rows are missing
    (``None``: nothing is missing yet, the rows are held for a retry).
    """

    reason: str
    rows_lost: int = 0
    missing_from_step: int | None = None


class CallbackHealth(msgspec.Struct, frozen=True):
    """One callback's line in the artifacts' callback report.

    ``coalesced`` is the part of ``dropped`` that a ``Latest`` policy replaced
    by design (a progress bar keeps the newest step), not a loss. ``disabled``
    is the reason a callback switched itself off for the run (a logger whose
    service refused it sets ``disabled_reason``), or why its own process can
    handle no more (``"process died: SIGKILL"``; it is then ``stuck`` too), else
    ``None``. ``startup_seconds`` is the start of a callback's own process
    (spawn, imports, ``setup``); 0 for a thread or task. ``hook_failures``
    counts failed calls of the hooks that are not events, by hook (``setup``,
    ``flush``, ``teardown``); ``degraded`` says why its output is incomplete
    (:class:`Degraded`), else ``None``. A callback is "ok" only when nothing
    failed, nothing was dropped or left pending, and it is neither disabled,
    stuck nor degraded (:attr:`ok`).
    """

    delivered: int
    failed: int
    dropped: int
    pending: int
    stuck: bool = False
    control_timeouts: int = 0
    coalesced: int = 0
    disabled: str | None = None
    startup_seconds: float = 0.0
    hook_failures: dict[str, int] = msgspec.field(default_factory=dict)
    degraded: Degraded | None = None

    @property
    def ok(self) -> bool:
        """Every event handled, no hook failed, nothing lost: the report may say "ok"."""
        lost = self.failed or (self.dropped - self.coalesced) or self.pending
        return not (lost or self.hook_failures or self.stuck or self.disabled or self.degraded)


class EvalTally(msgspec.Struct, frozen=True):
    """How one evaluator fared over a run: evals run, how many failed (an error, a
    timeout, an HTTP status), and the first failure's one-line text."""

    runs: int = 0
    failed: int = 0
    first_error: str | None = None


@dataclass
class LoopArtifacts:
    """What a run leaves behind; returned by ``TrainingLoop.run()``.

    ``train_seconds`` runs from just before the first step to the end of the
    last (evals and control waits included); ``drain_seconds`` is the
    shutdown after it. ``callback_report`` is empty in ``on_train_end`` (the
    drain has not happened yet) and filled on the value ``run()`` returns.
    ``error`` is a failed step's one line (``"RuntimeError: nan in grads"``);
    ``traceback`` its traceback, the user's frames only (also in the run dir's
    ``error.txt``). ``evals`` tallies each evaluator's runs and failures, by
    name. ``start_step`` is where this run began (``> 0``: a resume; the run
    as a whole has then done ``start_step + steps_completed`` steps).
    ``manifest_error`` is why ``manifest.json`` (or ``error.txt``) could not be
    written (``"OSError: [Errno 28] No space left on device"``), else ``None``:
    the run's own record is then missing, and whoever reports the run says so.
    """

    run_dir: Path
    manifest_path: Path | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    total_requested_steps: int = 0
    steps_completed: int = 0
    status: Status = "running"
    stop_reason: str | None = None
    train_seconds: float = 0.0
    drain_seconds: float = 0.0
    error: str | None = None
    callback_report: dict[str, CallbackHealth] = field(default_factory=dict)
    traceback: str | None = None
    evals: dict[str, EvalTally] = field(default_factory=dict)
    start_step: int = 0
    manifest_error: str | None = None


@dataclass
class LoopState:
    """The live state of a run, handed to every hook.

    ``step`` is the loop's position now (it may have moved on past the event
    a hook is handling; hooks take the step from ``step_idx``). The request
    methods are safe from any thread and take effect at the next step boundary.
    """

    num_steps: int = 0
    output_dir: Path = field(default_factory=lambda: Path("runs"))
    step: int = 0
    stop_requested: bool = False
    stop_reason: str | None = None
    stop_failed: bool = False
    stop_source: str = ""
    ctx: LogContext = field(default_factory=LogContext)
    rank: int = 0
    world_size: int = 1
    artifacts: LoopArtifacts | None = None
    model: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: the names of the run's evaluators (empty outside a loop, e.g. in replay)
    eval_names: tuple[str, ...] = ()
    #: the step this run began at: > 0 for a resume (writers drop their rows from it on)
    start_step: int = 0
    #: the run was asked to start its directories afresh (``overwrite=True``): a logger
    #: with a directory of its own empties and reuses it rather than claiming the next
    overwrite: bool = False
    _publish: Callable[[Event], object] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _checkpoint_requests: list[str] = field(default_factory=list, repr=False)
    _eval_requested: bool = field(default=False, repr=False)

    @property
    def run_dir(self) -> Path:
        """Where this run's files go: ``output_dir/<run_key>``, or ``output_dir``
        when the run has no key. A rank other than 0 has a directory of its own
        inside it, ``<run_key>/rank-<rank>``, so ranks never write one file between
        them (docs/distributed.md, "Ranks")."""
        key = self.ctx.run_key
        path = Path(self.output_dir) / key if key else Path(self.output_dir)
        return path / f"rank-{self.rank}" if self.rank > 0 else path

    def request_stop(self, reason: str | None = None, *, failed: bool = False) -> None:
        """End the run after the current step: status ``stopped`` (``failed`` if asked).

        The first request wins its reason; later ones are ignored.
        """
        with self._lock:
            if self.stop_requested:
                return
            sub = current_subscription()
            self.stop_source = sub.name if sub is not None else ""
            self.stop_reason = reason
            self.stop_failed = failed
            self.stop_requested = True

    def request_checkpoint(self, name: str) -> None:
        """Save a checkpoint named ``name`` at the next step boundary."""
        with self._lock:
            self._checkpoint_requests.append(name)

    def request_eval(self) -> None:
        """Run every evaluator at the next step boundary, due or not."""
        self._eval_requested = True

    def publish(self, event: Event) -> None:
        """Publish a custom event on the run's bus, stamped with the run's key.

        Safe from any thread; a no-op outside a run.
        """
        if self._publish is not None:
            self._publish(event)

    # -- the loop's side (not for hooks) -------------------------------------------

    def bind(self, publish: Callable[[Event], object] | None) -> None:
        """The loop's: where :meth:`publish` sends events (``None``: nowhere)."""
        self._publish = publish

    @property
    def has_requests(self) -> bool:
        """A stop, checkpoint or eval was requested and not yet taken (cheap, any thread)."""
        return self.stop_requested or self._eval_requested or bool(self._checkpoint_requests)

    def take_requests(self) -> tuple[list[str], bool]:
        """The loop's, at a step boundary: the checkpoints and whether an eval was
        requested since the last boundary (the stop request stays set)."""
        with self._lock:
            names, self._checkpoint_requests = self._checkpoint_requests, []
        wants_eval, self._eval_requested = self._eval_requested, False
        return names, wants_eval


# -- the experiment's records (``experiment.py`` runs them) ----------------------------


@dataclass
class Arm:
    """One configuration under test: a step function and the params it reads.

    The run's ``state.ctx.run_config`` holds ``params`` plus ``arm``, ``repeat``
    and ``seed`` (``base_seed + repeat``), so a step can seed itself.
    ``step`` is a :class:`~evsys_async.loop.TrainingLoop` step,
    ``step(state, step_idx)`` (``def`` or ``async def``); ``evaluators``, when
    given, replace the experiment's for this arm's runs (each an
    :class:`~evsys_async.evaluators.Evaluator`).
    """

    name: str
    step: Callable[[LoopState, int], Any]
    params: dict[str, Any] = field(default_factory=dict)
    # Evaluator is a protocol of the layer above this one: it cannot be named here
    evaluators: Sequence[Any] | None = None


@dataclass
class RunResult:
    """One run of one arm: its status and the last value of each eval metric."""

    run_key: str
    arm: str
    repeat: int
    status: str
    steps_completed: int
    metrics: dict[str, float]
    artifacts: LoopArtifacts | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``RunEnded.result``; a line of the experiment's result)."""
        return {
            "run_key": self.run_key,
            "repeat": self.repeat,
            "status": self.status,
            "steps_completed": self.steps_completed,
            "metrics": self.metrics,
            "error": self.error,
        }


@dataclass
class ArmResult:
    """The runs of one arm and the mean of each metric over its repeats."""

    arm: str
    runs: list[RunResult]
    mean: dict[str, float]


@dataclass
class ExperimentResult:
    """Every arm's result and the best arm by ``success_metric`` (``None`` if unknown)."""

    name: str
    arms: dict[str, ArmResult]
    success_metric: str | None
    best_arm: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "success_metric": self.success_metric,
            "best_arm": self.best_arm,
            "arms": {
                name: {"mean": a.mean, "runs": [r.to_dict() for r in a.runs]}
                for name, a in self.arms.items()
            },
        }
