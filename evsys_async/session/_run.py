"""SessionRun: a run whose steps another trainer takes, built from the loop's own phases.

A :class:`~evsys_async.session.Session` has no step function: the trainer
(Lightning, Hugging Face's ``Trainer``, a hand-written loop) runs the steps and
reports them. Everything else is a loop run's, reused, not copied
(docs/design.md, "A session"):

* the callbacks are subscribed as a run subscribes them
  (:class:`~evsys_async.callbacks._adapter.CallbackAdapter`, one subscriber
  each, filtered by run key; a ``controls_loop`` one watched by the loop's
  :class:`~evsys_async.loop._barrier.ControlBarrier`);
* a stop check is the loop's step boundary (:class:`Plan` says whether it has
  work, :class:`Boundary` passes it: the control barrier, with ranks the
  coordinator, ``StopRequested``);
* the end is the loop's :func:`~evsys_async.loop._shutdown.shutdown`:
  ``TrainEnded``, the drain, each callback's ``teardown``, the callback report,
  ``manifest.json``.

``SessionRun`` is what those phases see of a run (``BoundaryRun``,
``ShutdownRun``). It has no evaluators and no checkpoint function: its
``Evals`` and ``Checkpoints`` are the loop's with nothing to do. Loop thread only,
but for :attr:`plan`'s ``needed``, which any thread may read.
"""

from __future__ import annotations

import json
from typing import Any

import anyio

from .._util.aio import Deadline, shielded
from ..bus import EventBus, Subscription
from ..callbacks._adapter import CallbackAdapter
from ..events import Event, StepEnded
from ..loop._boundary import Boundary, Plan
from ..loop._control import Cancel
from ..loop._convert import Converter
from ..loop._runcore import RunCore
from ..loop._settings import RunSettings
from ..loop._shutdown import shutdown
from ..loop._step_thread import StepThread
from ..loop._steps import begin
from ..state import LoopArtifacts, LoopState, Status

__all__ = ["SessionRun", "no_step"]


def no_step(state: LoopState, step_idx: int) -> None:
    """The ``step`` of a session's ``RunSettings``: never called (the trainer steps)."""
    raise RuntimeError("a Session has no step function: the trainer runs the steps")


class SessionRun(RunCore):
    """One session's run on its bus (see the module docstring)."""

    def __init__(
        self,
        settings: RunSettings,
        state: LoopState,
        artifacts: LoopArtifacts,
        adapters: list[CallbackAdapter],
        bus: EventBus,
    ) -> None:
        # the coordinator's ``start``/``finish`` run in the step thread (made when first needed)
        step_thread = StepThread(f"evsys-session:{settings.run_key}", None, owned=True)
        super().__init__(
            settings, state, artifacts, adapters, bus, owns_bus=True, step_thread=step_thread
        )
        #: device metrics to floats off the caller's thread, every event in step order
        self.converter = Converter(
            f"evsys-convert:{settings.run_key}",
            bus.publish,
            lambda step, metrics: StepEnded(
                run_key=self.run_key,
                rank=state.rank,
                step=step,
                num_steps=state.num_steps,
                metrics=metrics,
            ),
        )
        #: the shutdown's view of a cancel (a session is never cancelled by loop.cancel)
        self.cancelling = anyio.Event()
        self.cancel_request: Cancel | None = None
        # both need the watched callbacks: made in start()
        self.plan: Plan | None = None
        self._boundary: Boundary | None = None

    # -- what the phases call ------------------------------------------------------

    def on_interrupt(self, exc: BaseException) -> None:
        """An ``async def`` hook raised ``KeyboardInterrupt``/``SystemExit``: the next
        stop check says stop, and the session re-raises it when it ends."""
        if self.interrupted is None:
            self.interrupted = exc
        self.state.request_stop("interrupted")

    # -- start, boundary, end ------------------------------------------------------

    async def start(self) -> None:
        """Subscribe the callbacks, join the ranks, ``TrainStarted`` (through the control
        barrier). Raises what subscribing raises and ``CoordinatorError``."""
        state, settings = self.state, self.settings
        state.bind(self.publish)
        for adapter in self.adapters:
            self.subs.append(
                adapter.subscribe(
                    self.bus, run_key=settings.run_key or None, on_interrupt=self.on_interrupt
                )
            )
        self.barrier.watch(self.adapters, self.subs)
        self.plan = Plan(state, self.barrier, settings)
        self._boundary = Boundary(self, settings)
        await begin(self, settings)

    async def boundary(self, step: int, steered: tuple[type[Event], ...]) -> Status | None:
        """The step boundary after ``step`` (the loop's): ``None`` to go on, or how the
        run ends. First takes in what other threads published, and waits for the
        steering callbacks of ``steered`` (event types published since the last
        boundary besides ``StepEnded``) to handle it."""
        assert self._boundary is not None  # started
        await self.converter.idle()  # the steps still on a device are published first
        self.bus.stats()  # on the loop thread: takes in what other threads published
        seq = self.bus.last_seq
        for event_type in steered:
            await self.barrier.wait(seq, event_type)
        verdict = await self._boundary.after(step, seq)
        if verdict is None and self.interrupted is not None:
            return "cancelled"
        return verdict

    def end_loop_subscriptions(self) -> list[Subscription]:
        """The shutdown's teardown: a session has no loop subscribers."""
        return []

    def steers(self, event_type: type[Event]) -> bool:
        """A steering callback handles ``event_type`` (fixed once started)."""
        return event_type is not StepEnded and self.barrier.applies(event_type)

    async def end(self, status: Status) -> None:
        """The loop's shutdown, shielded, under ``drain_timeout``: ``TrainEnded``, the
        drain, teardowns, the report and ``manifest.json``. Never raises for a callback."""
        deadline = Deadline(self.settings.drain_timeout)
        await shielded(self._end(status, deadline))

    async def _end(self, status: Status, deadline: Deadline) -> None:
        with anyio.move_on_after(deadline.left()):
            await self.converter.idle()  # every step published before TrainEnded
        self.converter.close()
        await shutdown(self, self.settings, status, deadline)

    def record_checkpoint(self, row: dict[str, Any]) -> None:
        """A checkpoint the trainer saved: its row in the artifacts and, on rank 0, in
        ``checkpoints.jsonl`` (one short line: written inline, as the loop does)."""
        self.artifacts.checkpoints.append(row)
        if self.state.rank == 0:
            line = json.dumps(row, default=str)
            with open(self.state.run_dir / "checkpoints.jsonl", "a", encoding="utf-8") as f:
                f.write(line + "\n")
