"""The steps of a run, the control barrier, and the one step-boundary seam.

After each step the loop publishes ``StepEnded`` and passes the *step
boundary* (:func:`boundary`): the control barrier for callbacks that steer the
loop, the evaluators that are due, requested or due checkpoints, and the stop
check. Every way of running steps goes through that one function.

* An ``async def`` step is awaited on the event loop, boundary after boundary.
* A ``def`` step runs in its step thread (a daemon of the run's own, or the
  caller's thread under ``run_sync()``), which runs the steps back to back and
  publishes ``StepEnded`` from there, like any thread may. The event loop
  steps in only where a boundary has work (:meth:`Gate.needed`): an eval
  or checkpoint due, a request, a controlling callback, a stop. Two thread
  hand-offs per step would cost more than the step itself for a fast one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from .._util.aio import LoopWaker, is_async_callable
from .._util.log import get_logger
from .._util.worker import DaemonWorker
from ..bus import Subscription
from ..callbacks._adapter import CallbackAdapter
from ..coordinator import StopRequest
from ..events import Event, StepEnded, StopRequested, TrainStarted
from ..state import Status
from ._metrics import metrics_of

if TYPE_CHECKING:
    from ._run import Run

__all__ = ["ControlBarrier", "StepFailed", "train"]

_log = get_logger()


class StepFailed(Exception):
    """The step (or its metrics) raised; carries the original exception."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class ControlBarrier:
    """After an event that steering callbacks handle, wait for them to handle it.

    Steering: ``controls_loop`` callbacks, or every callback with
    ``callback_errors="raise"`` (``every_callback``). Up to ``control_timeout``
    per event; past it a WARNING, a count in the callback's report, and the
    loop goes on. Callbacks that do not steer never slow the loop.
    """

    def __init__(self, *, control_timeout: float, every_callback: bool) -> None:
        self.control_timeout = control_timeout
        self.every_callback = every_callback
        #: with every_callback: the first failure seen (the run ends with it)
        self.callback_error: BaseException | None = None
        self._watched: list[tuple[CallbackAdapter, Subscription]] = []
        self._by_type: dict[type[Event], list[tuple[CallbackAdapter, Subscription]]] = {}
        self._failures_seen: dict[str, int] = {}

    def watch(self, adapters: list[CallbackAdapter], subs: list[Subscription]) -> None:
        self._watched = [
            (a, s)
            for a, s in zip(adapters, subs, strict=True)
            if self.every_callback or a.controls_loop
        ]
        self._by_type.clear()

    def applies(self, event_type: type[Event]) -> bool:
        """Some steering callback handles this event type (fixed for the run)."""
        return bool(self._steering(event_type))

    def _steering(self, event_type: type[Event]) -> list[tuple[CallbackAdapter, Subscription]]:
        found = self._by_type.get(event_type)
        if found is None:
            found = self._by_type[event_type] = [
                (a, s) for a, s in self._watched if a.handles(event_type)
            ]
        return found

    async def wait(self, seq: int | None, event_type: type[Event]) -> None:
        """Wait for the steering callbacks that handle ``event_type`` to handle ``seq``."""
        steering = self._steering(event_type)
        if seq is None or not steering:
            return
        deadline = time.monotonic() + self.control_timeout
        for adapter, sub in steering:
            if not await sub.wait(seq, max(0.0, deadline - time.monotonic())):
                adapter.control_timeouts += 1
                _log.warning(
                    "control callback did not keep up; the loop goes on",
                    callback=adapter.name,
                    event_type=event_type.__name__,
                    control_timeout=self.control_timeout,
                )
            if self.every_callback:
                st = sub.stats()
                failures = st.failed + st.hook_failures
                if failures > self._failures_seen.get(sub.name, 0) and self.callback_error is None:
                    self.callback_error = sub.last_error
                self._failures_seen[sub.name] = failures


# -- the steps ---------------------------------------------------------------------


async def train(run: Run) -> Status:
    """``TrainStarted``, then the steps until the end, a stop or a failure.

    ``train_seconds`` runs from just before the first step to the end of the
    last (boundaries included). Raises :class:`StepFailed` for a step that raised.
    """
    state = run.state
    coordinator = run.loop.coordinator
    if coordinator is not None:  # join the other ranks (blocks, in a thread, until all are there)
        await run.step_worker_for_calls().call(coordinator.start)
    seq = run.emit(
        TrainStarted,
        num_steps=state.num_steps,
        start_step=run.start_step,
        output_dir=str(state.run_dir),
        world_size=state.world_size,
    )
    await run.barrier.wait(seq, TrainStarted)
    if run.barrier.callback_error is not None:  # callback_errors="raise": before step 0
        return "failed"
    started = time.perf_counter()
    try:
        if is_async_callable(run.loop.step):
            return await _async_steps(run)
        return await _thread_steps(run)
    finally:
        run.artifacts.train_seconds = time.perf_counter() - started


async def _async_steps(run: Run) -> Status:
    state, step = run.state, run.loop.step
    batch_takers = _batch_takers(run)
    plan = Plan(run)
    for step_idx in range(run.start_step, state.num_steps):
        state.step = step_idx
        try:
            metrics, batch = metrics_of(await step(state, step_idx), step_idx)
        except Exception as exc:
            raise StepFailed(exc) from exc
        run.artifacts.steps_completed = step_idx + 1 - run.start_step
        for adapter in batch_takers:
            adapter.offer_batch(step_idx, batch)
        seq = run.emit(StepEnded, step=step_idx, num_steps=state.num_steps, metrics=metrics)
        if plan.needed(step_idx):
            ended = await boundary(run, step_idx, seq)
            if ended is not None:
                return ended
        await anyio.lowlevel.checkpoint()  # subscribers and cancellation make progress
    return "completed"


async def _thread_steps(run: Run) -> Status:
    """Run the steps in the step thread, serving the boundaries it asks for here, in
    the run's task (so they are cancelled with the run)."""
    worker = run.step_worker
    assert worker is not None
    gate = Gate(run, worker)
    outcome = worker.submit(_drive, run, gate)
    try:
        while not gate.finished:
            await gate.wait()
            asked = gate.take()
            if asked is not None:
                step_idx, metrics = asked
                seq = run.emit(StepEnded, step=step_idx, num_steps=gate.num_steps, metrics=metrics)
                gate.answer(await boundary(run, step_idx, seq))
        status: Status = await outcome.result()
        return status
    finally:
        gate.close()  # cancelled: the thread ends after the step in progress


class Plan:
    """Whether the boundary after a step has any work: decided in a few attribute reads,
    so a boundary without work costs (almost) nothing, on either path."""

    def __init__(self, run: Run) -> None:
        loop = run.loop
        self._state = run.state
        self._every = [
            every for ev in loop.evaluators if (every := int(getattr(ev, "run_every", 0) or 0))
        ]
        self._save_every = loop.save_every if loop.checkpoint is not None else 0
        # a steering callback sees every step (or a stop): then every boundary has work
        self._always = run.barrier.applies(StepEnded) or run.barrier.applies(StopRequested)
        self._coordinator = run.loop.coordinator

    def needed(self, step_idx: int) -> bool:
        """The boundary after ``step_idx`` has work: a steering callback, a request, or
        an eval or checkpoint due."""
        if self._always or self._state.has_requests:
            return True
        if self._coordinator is not None and self._coordinator.pending:
            return True
        i = step_idx + 1
        if self._save_every and i % self._save_every == 0:
            return True
        return any(i % every == 0 for every in self._every)


class Gate:
    """Between the step thread and the run's task: when the thread must stop at a
    boundary, and the hand-over when it does. While it waits for the boundary the
    step thread serves its worker's calls (a ``def`` checkpoint function runs
    there, in the step thread, as it would between two steps)."""

    def __init__(self, run: Run, worker: DaemonWorker) -> None:
        self._run = run
        self._worker = worker
        self._plan = Plan(run)
        self.num_steps = run.state.num_steps
        self.finished = False
        self._stop = False  # the run's task is gone (cancelled): end now
        self._asked: tuple[int, dict[str, float]] | None = None
        self._answer: Status | None = None
        self._answered = False
        self._bell = anyio.Event()
        self._waker = LoopWaker()

    # -- the step thread's side --------------------------------------------------

    def needed(self, step_idx: int) -> bool:
        """The boundary after ``step_idx`` has work for the event loop (cheap)."""
        return self._stop or self._plan.needed(step_idx)

    def ask(self, step_idx: int, metrics: dict[str, float]) -> Status | None:
        """Have the run's task publish ``StepEnded`` and pass the boundary; its verdict.
        Once the run's task is gone the step is published from here: it ran."""
        self._answered = False
        self._asked = (step_idx, metrics)
        if not self._stop:
            self._waker.soon(self._ring)
            self._worker.serve(until=lambda: self._answered)
        if self._stop and self.take() is not None:  # not taken: publish it from here
            self._run.bus.publish(self._step_ended(step_idx, metrics))
        return "cancelled" if self._stop else self._answer

    def done(self) -> None:
        self.finished = True
        self._waker.soon(self._ring)

    def _step_ended(self, step_idx: int, metrics: dict[str, float]) -> StepEnded:
        run = self._run
        return StepEnded(
            run_key=run.run_key,
            rank=run.state.rank,
            step=step_idx,
            num_steps=self.num_steps,
            metrics=metrics,
        )

    # -- the run's task's side ---------------------------------------------------

    def _ring(self) -> None:
        self._bell.set()

    async def wait(self) -> None:
        await self._bell.wait()
        self._bell = anyio.Event()

    def take(self) -> tuple[int, dict[str, float]] | None:
        asked, self._asked = self._asked, None
        return asked

    def answer(self, status: Status | None) -> None:
        self._answer = status
        self._answered = True
        self._worker.nudge()

    def close(self) -> None:
        self._stop = True
        self._answered = True
        self._worker.nudge()


def _drive(run: Run, gate: Gate) -> Status:
    """The steps, back to back, in the step thread (see the module docstring)."""
    try:
        return _steps_in_thread(run, gate)
    finally:
        gate.done()


def _steps_in_thread(run: Run, gate: Gate) -> Status:
    state, step = run.state, run.loop.step
    batch_takers = _batch_takers(run)
    publish, num_steps, run_key, rank = run.bus.publish, state.num_steps, run.run_key, state.rank
    for step_idx in range(run.start_step, num_steps):
        state.step = step_idx
        try:
            metrics, batch = metrics_of(step(state, step_idx), step_idx)
        except Exception as exc:
            raise StepFailed(exc) from exc
        run.artifacts.steps_completed = step_idx + 1 - run.start_step
        for adapter in batch_takers:
            adapter.offer_batch(step_idx, batch)
        if gate.needed(step_idx):
            ended = gate.ask(step_idx, metrics)
            if ended is not None:
                return ended
        else:
            publish(
                StepEnded(
                    run_key=run_key, rank=rank, step=step_idx, num_steps=num_steps, metrics=metrics
                )
            )
    return "completed"


async def boundary(run: Run, step_idx: int, seq: int | None) -> Status | None:
    """The step boundary after ``step_idx``; how the run ends here, or ``None`` to go on."""
    state = run.state
    await run.barrier.wait(seq, StepEnded)
    names, wants_eval = state.take_requests()
    await run.evals.after_step(step_idx, force=wants_eval)
    await run.checkpoints.after_step(step_idx, names)
    if run.barrier.callback_error is not None:
        return "failed"
    if run.loop.coordinator is not None:
        if not await _agreed(run, step_idx):
            return None
    elif not state.stop_requested:
        return None
    seq = run.emit(StopRequested, step=step_idx, reason=state.stop_reason, source=state.stop_source)
    await run.barrier.wait(seq, StopRequested)
    return "failed" if state.stop_failed else "stopped"


async def _agreed(run: Run, step_idx: int) -> bool:
    """With ranks: hand this rank's stop request to the coordinator once, and say
    whether the ranks have agreed to stop after this step (the run's stop fields
    then hold the agreed reason; ``run.stop_rank`` the rank that asked)."""
    state, coordinator = run.state, run.loop.coordinator
    assert coordinator is not None
    request = None
    if state.stop_requested and not run.stop_proposed:
        run.stop_proposed = True
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


def _batch_takers(run: Run) -> list[CallbackAdapter]:
    return [a for a in run.adapters if getattr(a.callback, "wants_batch", False)]
