"""Run: one execution of a :class:`~evsys_async.loop.TrainingLoop`, start to end.

:meth:`Run.execute` is the whole life of a run, in phases that live in their
own modules:

1. start: load saved callback states on a resume, subscribe each callback (one
   subscriber each; a process callback is shipped with its state), open the
   evaluators;
2. train (``_steps.py``): ``TrainStarted``, the steps, and after each the one
   step boundary (control barrier, evals ``_evals.py``, checkpoints
   ``_checkpoints.py``, stop);
3. shutdown (``_shutdown.py``): shielded, under one ``drain_timeout``,
   whichever way the run ended; then the step's exception, the callback's
   (``callback_errors="raise"``), an interrupt or the outer cancellation is
   re-raised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from .._util.aio import Deadline, shielded
from .._util.traceback import user_traceback
from .._util.worker import DaemonWorker
from ..bus import EventBus, Subscription
from ..callbacks._adapter import CallbackAdapter
from ..errors import describe
from ..evaluators import open_evaluators
from ..events import Event
from ..state import LoopArtifacts, LoopState, Status
from ._checkpoints import Checkpoints
from ._evals import Evals
from ._shutdown import shutdown
from ._steps import ControlBarrier, StepFailed, train

if TYPE_CHECKING:
    from . import TrainingLoop

__all__ = ["Run"]


class Run:
    """The state one run shares between its phases (see the module docstring)."""

    def __init__(
        self,
        loop: TrainingLoop,
        state: LoopState,
        artifacts: LoopArtifacts,
        adapters: list[CallbackAdapter],
        bus: EventBus,
        *,
        owns_bus: bool,
        start_step: int,
        step_worker: DaemonWorker | None,
        owns_worker: bool,
    ) -> None:
        self.loop = loop
        self.state = state
        self.artifacts = artifacts
        self.adapters = adapters
        self.bus = bus
        self.owns_bus = owns_bus
        self.start_step = start_step
        self.run_key = loop.run_key
        state.eval_names = tuple(str(ev.name) for ev in loop.evaluators)
        state.start_step = start_step
        self.subs: list[Subscription] = []
        #: where ``def`` steps (and a ``def`` checkpoint function) run: a daemon thread
        #: of the run's own, or the caller's thread under ``run_sync()``
        self.step_worker = step_worker
        self._owns_worker = owns_worker
        self.barrier = ControlBarrier(
            control_timeout=loop.control_timeout, every_callback=loop.callback_errors == "raise"
        )
        self.evals = Evals(self)
        self.checkpoints = Checkpoints(self)
        #: KeyboardInterrupt/SystemExit from one of this run's async hooks
        self.interrupted: BaseException | None = None
        #: cancelled by an interrupt: ends the train phase after the current step
        self.train_scope = anyio.CancelScope()
        #: the shutdown's one deadline, set when it starts (in-flight evals included)
        self.deadline: Deadline | None = None
        #: the rank whose stop request (or failure) ended this run, if one did
        self.stop_rank: int | None = None
        #: this rank's stop request was handed to the coordinator
        self.stop_proposed = False

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

    def step_worker_for_calls(self) -> DaemonWorker:
        """Where a ``def`` checkpoint function runs: the step thread, made if the step
        is ``async def``."""
        if self.step_worker is None:
            self.step_worker = DaemonWorker(f"evsys-step:{self.run_key}")
            self._owns_worker = True
        return self.step_worker

    def close_step_worker(self) -> None:
        """The run is done with its step thread (a caller's thread is the caller's)."""
        if self.step_worker is not None and self._owns_worker:
            self.step_worker.close()

    def start_shutdown_clock(self) -> Deadline:
        if self.deadline is None:
            self.deadline = Deadline(self.loop.drain_timeout)
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
        await shielded(shutdown(self, status))  # also through a native asyncio cancel
        if self.interrupted is not None and raised is not self.interrupted:
            raised = self.interrupted  # from a hook during the shutdown (on_train_end)
        if raised is not None:
            raise raised
        return self.artifacts

    async def _train_phase(self) -> tuple[Status, BaseException | None]:
        """The evaluators' setup and the steps; how they ended."""
        status: Status = "failed"
        raised: BaseException | None = None
        try:
            async with anyio.create_task_group() as eval_tg:
                self.evals.task_group = eval_tg
                with self.train_scope:
                    await open_evaluators(
                        self.loop.evaluators, self.state, timeout=self.loop.eval_timeout
                    )
                    status = await train(self)
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
