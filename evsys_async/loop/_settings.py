"""RunSettings: the fixed settings of one run, the record every phase of it reads.

``TrainingLoop.run()`` builds one per run (docs/design.md, "A run") from the
loop's arguments and the run's own: the run key it claimed and the step it
starts at. It is frozen, so no phase changes what another reads; the phases
take it beside a narrow ``Protocol`` of what they use of the run, never the
``TrainingLoop`` or the ``Run`` themselves (docs/design.md, "A run" and "The
layers").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..coordinator import Coordinator
from ..evaluators import Evaluator
from ..state import LoopState

__all__ = ["CheckpointFn", "RunSettings", "StepFn"]

#: ``step(state, step_idx)``, ``def`` or ``async def``: a metrics mapping, a
#: ``StepOutput`` or ``None``
StepFn = Callable[[LoopState, int], Any]
#: ``checkpoint(state, name)``, ``def`` or ``async def``: a path, a mapping (its
#: ``path`` key, if any, is the path) or ``None``
CheckpointFn = Callable[[LoopState, str], Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSettings:
    """What one run was asked to do; checked by ``TrainingLoop``, fixed for the run."""

    #: the user's step function
    step: StepFn
    #: the run key the run claimed (``<key>-1`` ... when the asked one was taken)
    run_key: str
    #: the first step this run takes (``> 0``: a resume)
    start_step: int
    evaluators: tuple[Evaluator, ...]
    #: a checkpoint after step i when ``(i + 1) % save_every == 0``; 0 never
    save_every: int
    checkpoint: CheckpointFn | None
    eval_mode: Literal["inline", "background"]
    eval_timeout: float
    max_evals_in_flight: int
    #: the model as a background eval sees it (``None``: the state's ``model``)
    snapshot: Callable[[LoopState], Any] | None
    #: how long the control barrier waits for a steering callback, per event
    control_timeout: float
    #: the shutdown's one deadline (docs/design.md, "The shutdown")
    drain_timeout: float
    callback_errors: Literal["log", "raise"]
    #: save ``interrupted`` at the end of a failed or cancelled run
    checkpoint_on_error: bool
    #: keeps the ranks in step; ``None`` for a single process
    coordinator: Coordinator | None
    #: what is otherwise logged and reported fails the run (``TrainingLoop(strict=)``)
    strict: bool = False
    #: the run's hyperparameters as recorded, credentials masked (``_runfiles.hparams_of``):
    #: ``TrainStarted.config`` and ``hparams.yaml``
    hparams: dict[str, Any] = field(default_factory=dict)
