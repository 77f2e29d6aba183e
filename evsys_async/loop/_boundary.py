"""The step boundary: whether the one after a step has work, and passing it.

After each step the loop publishes ``StepEnded`` and passes the *step
boundary* (docs/design.md, "A run"): the control barrier for callbacks that
steer the loop (``_barrier.py``), the evaluators that are due (``_evals.py``),
requested or due checkpoints (``_checkpoints.py``), and the stop check — with
ranks, through the coordinator. Every way of running steps (``_steps.py``)
goes through :meth:`Boundary.after`, and only where :meth:`Plan.needed` says
there is work: most boundaries have none, and deciding that costs a few
attribute reads (docs/performance.md).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..coordinator import StopRequest
from ..events import Event, StepEnded, StopRequested
from ..state import LoopState, Status
from ._barrier import ControlBarrier
from ._checkpoints import Checkpoints
from ._evals import Evals
from ._settings import RunSettings

__all__ = ["Boundary", "BoundaryRun", "Plan"]


class BoundaryRun(Protocol):
    """What the step boundary uses of its run; it writes only ``stop_rank``."""

    @property
    def state(self) -> LoopState: ...

    @property
    def barrier(self) -> ControlBarrier: ...

    @property
    def evals(self) -> Evals: ...

    @property
    def checkpoints(self) -> Checkpoints: ...

    #: the rank whose stop request (or failure) ended the run, once the ranks agreed
    stop_rank: int | None

    def emit(self, cls: type[Event], **fields: Any) -> int | None: ...


class Plan:
    """Whether the boundary after a step has any work: decided in a few attribute reads,
    so a boundary without work costs (almost) nothing, on either path. Read from the
    step thread too: everything it reads is fixed for the run, but for the state's
    requests and the coordinator's ``pending`` (plain flags)."""

    def __init__(self, state: LoopState, barrier: ControlBarrier, settings: RunSettings) -> None:
        self._state = state
        self._every = [
            every for ev in settings.evaluators if (every := int(getattr(ev, "run_every", 0) or 0))
        ]
        self._save_every = settings.save_every if settings.checkpoint is not None else 0
        # a steering callback sees every step (or a stop): then every boundary has work
        self._always = barrier.applies(StepEnded) or barrier.applies(StopRequested)
        self._coordinator = settings.coordinator
        #: an eval or a checkpoint falls due at some steps
        self._periodic = bool(self._every or self._save_every)

    def needed(self, step_idx: int) -> bool:
        """The boundary after ``step_idx`` has work: a steering callback, a request, or
        an eval or checkpoint due."""
        if self._always or self._state.has_requests:
            return True
        if self._coordinator is not None and self._coordinator.pending:
            return True
        if not self._periodic:
            return False
        i = step_idx + 1
        if self._save_every and i % self._save_every == 0:
            return True
        return any(i % every == 0 for every in self._every)


class Boundary:
    """The step boundary of one run (see the module docstring). Loop thread only."""

    def __init__(self, run: BoundaryRun, settings: RunSettings) -> None:
        self._run = run
        self._coordinator = settings.coordinator
        #: this rank's stop request was handed to the coordinator (once per run)
        self._stop_proposed = False

    async def after(self, step_idx: int, seq: int | None) -> Status | None:
        """Pass the boundary after ``step_idx`` (``seq``: its ``StepEnded``); how the run
        ends here, or ``None`` to go on.

        Blocks for the control barrier, inline evals, checkpoints and, with ranks,
        the coordinator. Raises what a checkpoint function raised.
        """
        run = self._run
        state = run.state
        await run.barrier.wait(seq, StepEnded)
        names, wants_eval = state.take_requests()
        await run.evals.after_step(step_idx, force=wants_eval)
        await run.checkpoints.after_step(step_idx, names)
        if run.barrier.callback_error is not None:
            return "failed"
        if self._coordinator is not None:
            if not await self._agreed(step_idx):
                return None
        elif not state.stop_requested:
            return None
        seq = run.emit(
            StopRequested, step=step_idx, reason=state.stop_reason, source=state.stop_source
        )
        await run.barrier.wait(seq, StopRequested)
        return "failed" if state.stop_failed else "stopped"

    async def _agreed(self, step_idx: int) -> bool:
        """With ranks: hand this rank's stop request to the coordinator once, and say
        whether the ranks have agreed to stop after this step (the run's stop fields
        then hold the agreed reason; ``run.stop_rank`` the rank that asked)."""
        run, coordinator = self._run, self._coordinator
        state = run.state
        assert coordinator is not None
        request = None
        if state.stop_requested and not self._stop_proposed:
            self._stop_proposed = True
            request = StopRequest(reason=state.stop_reason, failed=state.stop_failed)
        if request is None and not coordinator.pending:
            return False
        decision = await coordinator.at_boundary_async(step_idx, request)
        if decision is None or step_idx < decision.step:
            return False
        state.stop_requested = True
        state.stop_reason = decision.reason
        state.stop_failed = decision.failed
        if decision.rank != state.rank:
            state.stop_source = f"rank {decision.rank}"
        run.stop_rank = decision.rank
        return True
