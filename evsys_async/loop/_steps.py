"""The steps of a run: ``TrainStarted``, then one step after another, each followed
by its ``StepEnded`` and, where it has work, the step boundary (``_boundary.py``).

* An ``async def`` step is awaited on the event loop, boundary after boundary;
  the loop yields once per step so subscribers and cancellation make progress.
* A ``def`` step runs in the step thread (``_step_thread.py``: a daemon of the
  run's own, or the caller's thread under ``run_sync()``), which runs the
  steps back to back and publishes ``StepEnded`` from there, like any thread
  may. The event loop steps in only where a boundary has work
  (:meth:`Plan.needed`): an eval or checkpoint due, a request, a controlling
  callback, a stop. Two thread hand-offs per step would cost more than the
  step itself for a fast one.

Either way a step's metrics are read on the thread that ran it
(``_metrics.py``); values on a device are copied there and converted by the
run's converter (``_convert.py``), which publishes their ``StepEnded`` in
step order, so the training thread never waits for the device.

This is the hot path (docs/design.md, "A run"; docs/performance.md): each
loop below reads what it needs once, before the first step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import anyio
import anyio.lowlevel

from .._util.aio import LoopWaker, is_async_callable
from .._util.worker import DaemonWorker
from ..bus import EventBus
from ..callbacks._adapter import CallbackAdapter
from ..events import StepEnded, TrainStarted
from ..state import LoopArtifacts, Status
from ._boundary import Boundary, BoundaryRun, Plan
from ._convert import Converter
from ._metrics import MetricReader, Pending
from ._settings import RunSettings
from ._step_thread import StepThread

__all__ = ["StepFailed", "StepsRun", "begin", "train"]

Metrics = dict[str, float] | Pending


class StepsRun(BoundaryRun, Protocol):
    """What the steps use of their run, beyond what the boundary uses; they write
    only the counters in ``artifacts``."""

    @property
    def artifacts(self) -> LoopArtifacts: ...

    @property
    def bus(self) -> EventBus: ...

    @property
    def adapters(self) -> Sequence[CallbackAdapter]: ...

    @property
    def batch_takers(self) -> Sequence[CallbackAdapter]: ...

    @property
    def step_thread(self) -> StepThread: ...


class StepFailed(Exception):
    """The step (or its metrics) raised; carries the original exception."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


async def begin(run: StepsRun, settings: RunSettings) -> None:
    """Before the first step: join the other ranks (in the step thread, which blocks
    until every rank is there), then ``TrainStarted`` and its steering callbacks.
    A loop run and a session's both begin so."""
    state = run.state
    if settings.coordinator is not None:
        await run.step_thread.for_calls().call(settings.coordinator.start)
    seq = run.emit(
        TrainStarted,
        num_steps=state.num_steps,
        start_step=settings.start_step,
        output_dir=str(state.run_dir),
        world_size=state.world_size,
        config=settings.hparams,
    )
    await run.barrier.wait(seq, TrainStarted)


async def train(run: StepsRun, settings: RunSettings) -> Status:
    """``TrainStarted``, then the steps until the end, a stop or a failure.

    With ranks, first joins the others (blocks, in the step thread, until all
    are there). ``train_seconds`` runs from just before the first step to the
    end of the last (boundaries included). Raises :class:`StepFailed` for a
    step that raised; cancelled from outside, it ends after the step in progress.
    """
    await begin(run, settings)
    if run.barrier.callback_error is not None:  # callback_errors="raise": before step 0
        return "failed"
    started = time.perf_counter()
    try:
        steps = _Steps(run, settings)
        if is_async_callable(settings.step):
            return await _async_steps(run, settings, steps)
        return await _thread_steps(run, settings, steps)
    finally:
        run.artifacts.train_seconds = time.perf_counter() - started


class _Steps:
    """What both ways of running steps share, made once per run."""

    def __init__(self, run: StepsRun, settings: RunSettings) -> None:
        self.plan = Plan(run.state, run.barrier, settings)
        self.boundary = Boundary(run, settings)
        self.reader = MetricReader("step", strict=settings.strict)
        run_key, rank, num_steps = settings.run_key, run.state.rank, run.state.num_steps

        def step_ended(step_idx: int, metrics: dict[str, float]) -> StepEnded:
            return StepEnded(
                run_key=run_key, rank=rank, step=step_idx, num_steps=num_steps, metrics=metrics
            )

        self.step_ended = step_ended
        self.num_steps = num_steps
        self.converter: Converter = run.step_thread.converter_for(run.bus.publish, step_ended)


async def _async_steps(run: StepsRun, settings: RunSettings, steps: _Steps) -> Status:
    state, step, start = run.state, settings.step, settings.start_step
    artifacts, emit, plan, boundary = run.artifacts, run.emit, steps.plan, steps.boundary
    read, converter = steps.reader.step_output, steps.converter
    batch_takers = run.batch_takers
    for step_idx in range(start, state.num_steps):
        state.step = step_idx
        try:
            metrics, batch = read(await step(state, step_idx), step_idx)
        except Exception as exc:
            raise StepFailed(exc) from exc
        artifacts.steps_completed = step_idx + 1 - start
        for adapter in batch_takers:
            adapter.offer_batch(step_idx, batch)
        needed = plan.needed(step_idx)
        if converter.pending:  # earlier steps' values on a device: publish those converted
            converter.take_ready()
        if converter.pending or isinstance(metrics, Pending):  # still converting: queue
            if not needed:
                converter.publish_later(step_idx, metrics, on_loop=True)
                await anyio.lowlevel.checkpoint()
                continue
            metrics = await converter.converted(metrics, step_idx)  # the boundary waits
        seq = emit(StepEnded, step=step_idx, num_steps=state.num_steps, metrics=metrics)
        if needed:
            ended = await boundary.after(step_idx, seq)
            if ended is not None:
                return ended
        await anyio.lowlevel.checkpoint()  # subscribers and cancellation make progress
    return "completed"


async def _thread_steps(run: StepsRun, settings: RunSettings, steps: _Steps) -> Status:
    """Run the steps in the step thread, serving the boundaries it asks for here, in
    the run's task (so they are cancelled with the run)."""
    worker = run.step_thread.worker
    assert worker is not None  # made for a def step before the run starts
    await worker.call(_up)  # raises what entering its framework context raised
    gate = Gate(steps, worker)
    converter = steps.converter
    outcome = worker.submit(_drive, run, settings, steps, gate)
    try:
        while not gate.finished:
            await gate.wait()
            asked = gate.take()
            if asked is not None:
                step_idx, metrics = asked
                if converter.pending or isinstance(metrics, Pending):  # the boundary waits
                    metrics = await converter.converted(metrics, step_idx)
                seq = run.emit(StepEnded, step=step_idx, num_steps=gate.num_steps, metrics=metrics)
                gate.answer(await steps.boundary.after(step_idx, seq))
        status: Status = await outcome.result()
        return status
    finally:
        gate.close()  # cancelled: the thread ends after the step in progress


class Gate:
    """Between the step thread and the run's task: when the thread must stop at a
    boundary, and the hand-over when it does. While it waits for the boundary the
    step thread serves its worker's calls (a ``def`` checkpoint function runs
    there, in the step thread, as it would between two steps)."""

    def __init__(self, steps: _Steps, worker: DaemonWorker) -> None:
        self._publish_step = steps.converter.publish_step
        self._worker = worker
        self._plan = steps.plan
        self.num_steps = steps.num_steps
        self.finished = False
        self._stop = False  # the run's task is gone (cancelled): end now
        self._asked: tuple[int, Metrics] | None = None
        self._answer: Status | None = None
        self._answered = False
        self._bell = anyio.Event()
        self._waker = LoopWaker()

    # -- the step thread's side --------------------------------------------------

    def needed(self, step_idx: int) -> bool:
        """The boundary after ``step_idx`` has work for the event loop (cheap)."""
        return self._stop or self._plan.needed(step_idx)

    def ask(self, step_idx: int, metrics: Metrics) -> Status | None:
        """Have the run's task publish ``StepEnded`` and pass the boundary; its verdict.
        Once the run's task is gone the step is published from here: it ran."""
        self._answered = False
        self._asked = (step_idx, metrics)
        if not self._stop:
            self._waker.soon(self._ring)
            self._worker.serve(until=lambda: self._answered)
        if self._stop and self.take() is not None:  # not taken: publish it from here
            self._publish_step(step_idx, metrics)
        return "cancelled" if self._stop else self._answer

    def done(self) -> None:
        self.finished = True
        self._waker.soon(self._ring)

    # -- the run's task's side ---------------------------------------------------

    def _ring(self) -> None:
        self._bell.set()

    async def wait(self) -> None:
        await self._bell.wait()
        self._bell = anyio.Event()

    def take(self) -> tuple[int, Metrics] | None:
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


def _up() -> None:
    """Nothing: a call that returns once the step thread is up, inside its context."""


def _drive(run: StepsRun, settings: RunSettings, steps: _Steps, gate: Gate) -> Status:
    """The steps, back to back, in the step thread (see the module docstring)."""
    try:
        return _steps_in_thread(run, settings, steps, gate)
    finally:
        gate.done()


def _steps_in_thread(run: StepsRun, settings: RunSettings, steps: _Steps, gate: Gate) -> Status:
    state, step, start = run.state, settings.step, settings.start_step
    artifacts = run.artifacts
    batch_takers = run.batch_takers
    publish, read, converter = run.bus.publish, steps.reader.step_output, steps.converter
    run_key, rank, num_steps = settings.run_key, state.rank, state.num_steps
    step_thread = run.step_thread
    for step_idx in range(start, num_steps):
        state.step = step_idx
        try:
            metrics, batch = read(step(state, step_idx), step_idx)
        except Exception as exc:
            raise StepFailed(exc) from exc
        if step_thread.abandoned:  # the run ended without this step ("The shutdown")
            return "cancelled"
        artifacts.steps_completed = step_idx + 1 - start
        for adapter in batch_takers:
            adapter.offer_batch(step_idx, batch)
        if gate.needed(step_idx):
            ended = gate.ask(step_idx, metrics)
            if ended is not None:
                return ended
        elif converter.pending or isinstance(metrics, Pending):  # values on a device
            converter.publish_later(step_idx, metrics)
        else:
            publish(
                StepEnded(
                    run_key=run_key, rank=rank, step=step_idx, num_steps=num_steps, metrics=metrics
                )
            )
    return "completed"
