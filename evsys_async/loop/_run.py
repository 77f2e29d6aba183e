"""Run: one execution of a ``TrainingLoop``, start to end.

:meth:`Run.execute` is the whole life of a run (docs/design.md, "A run"), in
phases that live in their own modules and see the run only through a
``Protocol`` of what each uses (``StepsRun``, ``EvalsRun``, ``CheckpointsRun``,
``ShutdownRun``) beside the frozen ``RunSettings`` (``_settings.py``):

1. start: load saved callback states on a resume (``_checkpoints.py``),
   subscribe each callback (one subscriber each; a process callback is shipped
   with its state), open the evaluators;
2. train (``_steps.py``): ``TrainStarted``, the steps, and after each the one
   step boundary (``_boundary.py``: control barrier ``_barrier.py``, evals
   ``_evals.py``, checkpoints ``_checkpoints.py``, stop);
3. shutdown (``_shutdown.py``): shielded, under one ``drain_timeout``,
   whichever way the run ended; then the step's exception, the callback's
   (``callback_errors="raise"``), an interrupt or the outer cancellation is
   re-raised (docs/design.md, "Cancellation and interrupts").

``Run`` is the one object that holds what the phases share; only the facade
(``_loop.py``) makes one, and no phase imports this module.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec

from .._util.aio import Deadline, shielded
from .._util.traceback import user_traceback
from ..bus import EventBus, Subscription
from ..callbacks._adapter import CallbackAdapter
from ..errors import describe
from ..evaluators.base import open_evaluators
from ..events import Event
from ..state import LoopArtifacts, LoopState, Status
from ._barrier import ControlBarrier
from ._checkpoints import Checkpoints
from ._evals import Evals
from ._settings import RunSettings
from ._shutdown import shutdown
from ._step_thread import StepThread
from ._steps import StepFailed, train

__all__ = ["Run"]


class Run:
    """What one run's phases share (see the module docstring). Loop thread only."""

    def __init__(
        self,
        settings: RunSettings,
        state: LoopState,
        artifacts: LoopArtifacts,
        adapters: list[CallbackAdapter],
        bus: EventBus,
        *,
        owns_bus: bool,
        step_thread: StepThread,
    ) -> None:
        self.settings = settings
        self.state = state
        self.artifacts = artifacts
        self.adapters = adapters
        self.bus = bus
        #: the run made ``bus`` (and closes it)
        self.owns_bus = owns_bus
        self.run_key = settings.run_key
        state.eval_names = tuple(str(ev.name) for ev in settings.evaluators)
        state.start_step = settings.start_step
        #: one per adapter, in order, once started
        self.subs: list[Subscription] = []
        #: where ``def`` steps (and a ``def`` checkpoint function) run
        self.step_thread = step_thread
        self.barrier = ControlBarrier(
            control_timeout=settings.control_timeout,
            every_callback=settings.callback_errors == "raise",
        )
        self.evals = Evals(self, settings)
        self.checkpoints = Checkpoints(self, settings)
        #: KeyboardInterrupt/SystemExit from one of this run's async hooks
        self.interrupted: BaseException | None = None
        #: cancelled by an interrupt: ends the train phase after the current step
        self.train_scope = anyio.CancelScope()
        #: the shutdown's one deadline, set when it starts (in-flight evals included)
        self.deadline: Deadline | None = None
        #: the rank whose stop request (or failure) ended this run, if one did
        self.stop_rank: int | None = None

    # -- publishing --------------------------------------------------------------

    def publish(self, event: Event) -> int | None:
        """``state.publish``: a user's event, stamped with the run key (a copy: frozen)."""
        rank = self.state.rank
        if (self.run_key and not event.run_key) or event.rank != rank:
            event = msgspec.structs.replace(event, run_key=event.run_key or self.run_key, rank=rank)
        return self.bus.publish(event)

    def emit(self, cls: type[Event], **fields: Any) -> int | None:
        """Publish one of the loop's own events, built with the run key (no copy)."""
        return self.bus.publish(cls(run_key=self.run_key, rank=self.state.rank, **fields))

    def on_interrupt(self, exc: BaseException) -> None:
        """An ``async def`` hook raised ``KeyboardInterrupt``/``SystemExit``: the run
        ends as ``cancelled`` after the current step and re-raises it at the end."""
        if self.interrupted is None:
            self.interrupted = exc
        self.train_scope.cancel()

    def start_shutdown_clock(self) -> Deadline:
        """The shutdown's deadline, started by the first call."""
        if self.deadline is None:
            self.deadline = Deadline(self.settings.drain_timeout)
        return self.deadline

    # -- the whole run -----------------------------------------------------------

    async def execute(self) -> LoopArtifacts:
        """Start, train, shut down; return the artifacts or re-raise (module docstring)."""
        self.state.bind(self.publish)
        # before subscribing: a callback in its own process is shipped with its state
        self.checkpoints.load_callback_states()
        for adapter in self.adapters:
            self.subs.append(
                adapter.subscribe(
                    self.bus, run_key=self.run_key or None, on_interrupt=self.on_interrupt
                )
            )
        self.barrier.watch(self.adapters, self.subs)
        status, raised = await self._train_phase()
        if raised is None and self.barrier.callback_error is not None:
            raised = self.barrier.callback_error
            status = "failed"
            self.artifacts.error = describe(raised)
        # also through a native asyncio cancel
        await shielded(shutdown(self, self.settings, status, self.start_shutdown_clock()))
        if self.interrupted is not None and raised is not self.interrupted:
            raised = self.interrupted  # from a hook during the shutdown (on_train_end)
        if raised is not None:
            raise raised
        return self.artifacts

    async def _train_phase(self) -> tuple[Status, BaseException | None]:
        """The evaluators' setup and the steps; how they ended."""
        settings = self.settings
        status: Status = "failed"
        raised: BaseException | None = None
        try:
            async with anyio.create_task_group() as eval_tg:
                self.evals.task_group = eval_tg
                with self.train_scope:
                    await open_evaluators(
                        settings.evaluators, self.state, timeout=settings.eval_timeout
                    )
                    status = await train(self, settings)
                if self.interrupted is not None:
                    status, raised = "cancelled", self.interrupted
                # in-flight background evals are part of the shutdown
                await self.evals.finish(self.start_shutdown_clock())
        except StepFailed as exc:  # the step (or its metrics) raised
            status, raised = "failed", exc.original
            self.artifacts.error = describe(exc.original)
            self.artifacts.traceback = user_traceback(exc.original)
        except BaseException as exc:  # cancelled from outside, an interrupt, or a bug
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            if isinstance(exc, StepFailed):  # wrapped by the task group on trio
                status, raised = "failed", exc.original
                self.artifacts.error = describe(exc.original)
                self.artifacts.traceback = user_traceback(exc.original)
            elif isinstance(exc, anyio.get_cancelled_exc_class() | KeyboardInterrupt | SystemExit):
                status, raised = "cancelled", exc
            else:
                status, raised = "failed", exc
                self.artifacts.error = describe(exc)
        return status, raised
