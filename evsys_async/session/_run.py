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
import msgspec

from .._util.aio import Deadline, shielded
from ..bus import EventBus, Subscription
from ..callbacks._adapter import CallbackAdapter
from ..events import Event, StepEnded, TrainStarted
from ..loop._barrier import ControlBarrier
from ..loop._boundary import Boundary, Plan
from ..loop._checkpoints import Checkpoints
from ..loop._control import Cancel
from ..loop._convert import Converter
from ..loop._evals import Evals
from ..loop._settings import RunSettings
from ..loop._shutdown import shutdown
from ..loop._step_thread import StepThread
from ..state import LoopArtifacts, LoopState, Status

__all__ = ["SessionRun", "no_step"]


def no_step(state: LoopState, step_idx: int) -> None:
    """The ``step`` of a session's ``RunSettings``: never called (the trainer steps)."""
    raise RuntimeError("a Session has no step function: the trainer runs the steps")


class SessionRun:
    """One session's run on its bus (see the module docstring)."""

    def __init__(
        self,
        settings: RunSettings,
        state: LoopState,
        artifacts: LoopArtifacts,
        adapters: list[CallbackAdapter],
        bus: EventBus,
        *,
        config: dict[str, Any],
    ) -> None:
        self.settings = settings
        self.state = state
        self.artifacts = artifacts
        self.adapters = adapters
        self.bus = bus
        #: the session made ``bus``: the shutdown drains all of it and bounds its close
        self.owns_bus = True
        self.subs: list[Subscription] = []
        #: where the coordinator's ``start``/``finish`` run (made when first needed)
        self.step_thread = StepThread(f"evsys-session:{settings.run_key}", None, owned=True)
        self.barrier = ControlBarrier(
            control_timeout=settings.control_timeout,
            every_callback=settings.callback_errors == "raise",
        )
        self.evals = Evals(self, settings)
        self.checkpoints = Checkpoints(self, settings)
        #: the rank whose stop request (or failure) ended the run, once the ranks agreed
        self.stop_rank: int | None = None
        #: KeyboardInterrupt/SystemExit from one of the session's ``async def`` hooks
        self.interrupted: BaseException | None = None
        #: device metrics to floats off the caller's thread, every event in step order
        self.converter = Converter(
            f"evsys-convert:{settings.run_key}",
            bus.publish,
            lambda step, metrics: self.make(
                StepEnded, step=step, num_steps=state.num_steps, metrics=metrics
            ),
        )
        self._config = config
        #: the shutdown's view of a cancel (a session is never cancelled by loop.cancel)
        self.cancelling = anyio.Event()
        self.cancel_request: Cancel | None = None
        # both need the watched callbacks: made in start()
        self.plan: Plan | None = None
        self._boundary: Boundary | None = None

    # -- what the phases call ------------------------------------------------------

    def make(self, cls: type[Event], **fields: Any) -> Event:
        """One of the run's own events, stamped with its run key and rank."""
        return cls(run_key=self.settings.run_key, rank=self.state.rank, **fields)

    def emit(self, cls: type[Event], **fields: Any) -> int | None:
        """Publish one of the run's own events, stamped with its run key and rank."""
        return self.bus.publish(self.make(cls, **fields))

    def publish(self, event: Event) -> int | None:
        """``state.publish``: a callback's event, stamped with the run key and rank."""
        key, rank = self.settings.run_key, self.state.rank
        if (key and not event.run_key) or event.rank != rank:
            event = msgspec.structs.replace(event, run_key=event.run_key or key, rank=rank)
        return self.bus.publish(event)

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
        if settings.coordinator is not None:  # blocks until every rank is there
            await self.step_thread.for_calls().call(settings.coordinator.start)
        seq = self.emit(
            TrainStarted,
            num_steps=state.num_steps,
            start_step=settings.start_step,
            output_dir=str(state.run_dir),
            world_size=state.world_size,
            config=self._config,
        )
        await self.barrier.wait(seq, TrainStarted)

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
