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

While it runs, the run is attached to its loop's :class:`~._control.RunControl`
(as an ``ActiveRun``): ``loop.request_stop`` reaches its state, ``loop.cancel``
its :meth:`Run.cancel_now`, and the loop's subscribers
(:class:`~._subscribers.LoopSubscription`) are subscribed to its bus with its
run key, from its start until its teardown.

``Run`` is the one object that holds what the phases share; only the facade
(``_loop.py``) makes one, and no phase imports this module.
"""

from __future__ import annotations

import anyio
import anyio.abc
import anyio.lowlevel

from .._util.aio import Deadline, LoopWaker, shielded
from .._util.log import get_logger
from .._util.traceback import user_traceback
from ..bus import EventBus, Subscription
from ..callbacks._adapter import CallbackAdapter
from ..errors import describe
from ..evaluators.base import open_evaluators
from ..state import LoopArtifacts, LoopState, Status
from ._control import Cancel, RunControl
from ._runcore import RunCore
from ._runfiles import write_hparams
from ._settings import RunSettings
from ._shutdown import shutdown
from ._step_thread import StepThread
from ._steps import StepFailed, train
from ._subscribers import LoopSubscription

__all__ = ["Run"]

_log = get_logger()


class Run(RunCore):
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
        control: RunControl | None = None,
        own_thread: bool = False,
    ) -> None:
        super().__init__(
            settings, state, artifacts, adapters, bus, owns_bus=owns_bus, step_thread=step_thread
        )
        state.eval_names = tuple(str(ev.name) for ev in settings.evaluators)
        state.start_step = settings.start_step
        #: cancelled by an interrupt: ends the train phase after the current step
        self.train_scope = anyio.CancelScope()
        #: the shutdown's one deadline, set when it starts (in-flight evals included)
        self.deadline: Deadline | None = None
        #: the loop's control, which this run attaches to while it runs
        self.control = control
        #: the run has an event loop of its own (``run(own_thread=True)``)
        self.own_thread = own_thread
        #: runs callbacks on this run's event loop from any thread
        self.waker = LoopWaker()
        #: ``loop.cancel``: why, and the grace a ``def`` step in flight gets; set once
        self.cancel_request: Cancel | None = None
        #: set when the run is cancelled (the shutdown's grace for a ``def`` step starts)
        self.cancelling = anyio.Event()
        #: the loop's subscribers, subscribed to this run, until its teardown
        self.loop_subs: list[tuple[LoopSubscription, Subscription]] = []
        self._taking_subscribers = True
        #: where a closed subscriber's subscription is ended while the run goes on
        self._side: anyio.abc.TaskGroup | None = None

    def on_interrupt(self, exc: BaseException) -> None:
        """An ``async def`` hook raised ``KeyboardInterrupt``/``SystemExit``: the run
        ends as ``cancelled`` after the current step and re-raises it at the end."""
        if self.interrupted is None:
            self.interrupted = exc
        self.train_scope.cancel()

    # -- the loop's control (``ActiveRun``) -------------------------------------------

    def request_stop(self, reason: str | None) -> None:
        """``loop.request_stop``: end after the current step (any thread)."""
        self.state.request_stop(reason)

    def cancel_now(self, cancel: Cancel) -> None:
        """``loop.cancel``, on the loop: end the train phase now; the first reason wins.
        A ``def`` step in flight gets ``cancel.grace`` seconds (the shutdown)."""
        if self.cancel_request is None:
            self.cancel_request = cancel
        self.cancelling.set()
        self.train_scope.cancel()

    def add_subscriber(self, handle: LoopSubscription) -> None:
        """Subscribe one of the loop's subscribers to this run (on the loop); after the
        teardown began it waits for the next run. A subscriber the bus refuses (a
        process handler that does not pickle) is a WARNING."""
        if not self._taking_subscribers or handle.closed:
            return
        if any(h is handle for h, _ in self.loop_subs):  # asked as the run attached
            return
        try:
            sub = handle.subscribe(self.bus, self.run_key or None, own_thread=self.own_thread)
        except Exception as exc:
            _log.warning("loop subscriber refused", subscriber=handle.name, error=repr(exc))
            return
        self.loop_subs.append((handle, sub))

    def drop_subscriber(self, handle: LoopSubscription) -> None:
        """End a closed subscriber's subscription to this run (on the loop): it gets
        nothing published from now on. In the shutdown, the teardown ends it."""
        for i, (h, sub) in enumerate(self.loop_subs):
            if h is handle and self._side is not None:
                del self.loop_subs[i]
                self._side.start_soon(sub.aclose, 0.0)
                return

    def end_loop_subscriptions(self) -> list[Subscription]:
        """The shutdown's teardown: no subscriber joins from here on; the subscriptions
        to end."""
        self._taking_subscribers = False
        return [sub for _, sub in self.loop_subs]

    def start_shutdown_clock(self) -> Deadline:
        """The shutdown's deadline, started by the first call."""
        if self.deadline is None:
            self.deadline = Deadline(self.settings.drain_timeout)
        return self.deadline

    # -- the whole run -----------------------------------------------------------

    async def execute(self) -> LoopArtifacts:
        """Start, train, shut down; return the artifacts or re-raise (module docstring)."""
        async with anyio.create_task_group() as side:
            self._side = side
            try:
                raised = await self._attached()
            except BaseException as exc:  # a refused subscriber, a cancel past the shutdown:
                raised = exc  # re-raised below, not wrapped in the task group's group
            self._side = None
        if raised is not None:
            raise raised
        return self.artifacts

    async def _attached(self) -> BaseException | None:
        """The run's life while it is attached to its loop's control."""
        cancel, handles = self.control.attach(self) if self.control else (None, [])
        try:
            return await self._life(cancel, handles)
        finally:
            if self.control is not None:
                self.control.detach()

    async def _life(
        self, cancel: Cancel | None, handles: list[LoopSubscription]
    ) -> BaseException | None:
        """Start, train, shut down; what to re-raise, if anything."""
        if self.state.rank == 0:  # on disk before the first event, as TrainStarted says
            write_hparams(self.state.run_dir, self.settings.hparams)
        self.state.bind(self.publish)
        # before subscribing: a callback in its own process is shipped with its state
        self.checkpoints.load_callback_states()
        for adapter in self.adapters:
            self.subs.append(
                adapter.subscribe(
                    self.bus, run_key=self.run_key or None, on_interrupt=self.on_interrupt
                )
            )
        for handle in handles:
            self.add_subscriber(handle)
        self.barrier.watch(self.adapters, self.subs)
        if cancel is not None:  # asked before the run started: it ends before step 0
            self.cancel_now(cancel)
        status, raised = await self._train_phase()
        if raised is None and self.barrier.callback_error is not None:
            raised = self.barrier.callback_error
            status = "failed"
            self.artifacts.error = self._callback_error(raised)
        # also through a native asyncio cancel
        await shielded(shutdown(self, self.settings, status, self.start_shutdown_clock()))
        if self.interrupted is not None and raised is not self.interrupted:
            raised = self.interrupted  # from a hook during the shutdown (on_train_end)
        return raised

    def _callback_error(self, exc: BaseException) -> str:
        """A callback's error that failed the run, in one line naming the callback."""
        for adapter, sub in zip(self.adapters, self.subs, strict=True):
            if sub.last_error is exc:
                return f"callback {adapter.name!r} failed: {describe(exc)}"
        return describe(exc)

    async def _train_phase(self) -> tuple[Status, BaseException | None]:
        """The evaluators' setup and the steps; how they ended."""
        settings = self.settings
        status: Status = "failed"
        raised: BaseException | None = None
        try:
            async with anyio.create_task_group() as eval_tg:
                self.evals.task_group = eval_tg
                with self.train_scope:
                    await anyio.lowlevel.checkpoint_if_cancelled()  # a cancel before the run
                    await open_evaluators(
                        settings.evaluators, self.state, timeout=settings.eval_timeout
                    )
                    status = await train(self, settings)
                if self.interrupted is not None:
                    status, raised = "cancelled", self.interrupted
                elif self.cancel_request is not None and self.train_scope.cancelled_caught:
                    status = "cancelled"  # loop.cancel: run() returns the artifacts
                    self.state.stop_reason = self.cancel_request.reason
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
