"""Evals: the evaluators that are due at a step boundary, inline or in the background.

Inline (the default, as in the original system): the due evaluators run
concurrently and the loop awaits them all before the next step. Background:
training goes on while they run, at most ``max_evals_in_flight`` at a time;
each reads a view of the state (``snapshot(state)`` for the model, never the
moving one) and its ``EvalEnded`` carries the step it evaluated. Either way
each runs under ``eval_timeout``; a failure or a timeout (an exception, an
HTTP status, ``eval_timeout``) is expected: one WARNING line naming the
evaluator, the step and the error (its traceback at DEBUG), an ``EvalFailed``
event, and training goes on. Each evaluator's runs and failures are tallied
in ``artifacts.evals`` (``EvalTally``) for the report and the summary. Its
metrics are read as a step's are (``_metrics.py``: flattened, non-numbers
skipped with one WARNING per key; values on a device converted off the loop,
by the run's converter). Background evals still in flight at the end are
part of the shutdown (docs/design.md, "A run" and "The shutdown").
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

import anyio
import msgspec
from anyio.abc import TaskGroup

from .._util.aio import Deadline
from .._util.log import get_logger
from ..errors import describe
from ..evaluators import Evaluator
from ..events import EvalEnded, EvalFailed, Event
from ..state import EvalTally, LoopArtifacts, LoopState
from ._barrier import ControlBarrier
from ._metrics import MetricReader, Pending
from ._settings import RunSettings
from ._step_thread import StepThread

__all__ = ["Evals", "EvalsRun"]

_log = get_logger()

Result = Mapping[str, float] | BaseException


class EvalsRun(Protocol):
    """What evals use of their run."""

    @property
    def state(self) -> LoopState: ...

    @property
    def barrier(self) -> ControlBarrier: ...

    @property
    def artifacts(self) -> LoopArtifacts: ...

    @property
    def step_thread(self) -> StepThread: ...

    def emit(self, cls: type[Event], **fields: Any) -> int | None: ...


class Evals:
    """One run's evaluators (see the module docstring). Loop thread only."""

    def __init__(self, run: EvalsRun, settings: RunSettings) -> None:
        self.run = run
        self.evaluators = settings.evaluators
        self.background = settings.eval_mode == "background"
        self.timeout = settings.eval_timeout
        self.max_in_flight = settings.max_evals_in_flight
        self.snapshot = settings.snapshot
        #: where background evals run: the run's, set for the train phase (cancelled
        #: at the shutdown's deadline)
        self.task_group: TaskGroup | None = None
        self.in_flight = 0
        self._slot = anyio.Event()  # set when a background eval finishes
        self._strict = settings.strict
        #: each evaluator's metric reader (its own once-per-key warnings), by name
        self._readers: dict[str, MetricReader] = {}

    def due(self, step_idx: int, *, force: bool = False) -> list[Evaluator]:
        """The evaluators that fire after ``step_idx``: ``(step_idx + 1) % run_every == 0``."""
        return [
            ev
            for ev in self.evaluators
            if force
            or ((every := int(getattr(ev, "run_every", 0) or 0)) and (step_idx + 1) % every == 0)
        ]

    async def after_step(self, step_idx: int, *, force: bool = False) -> None:
        """Run what is due after ``step_idx`` (all of them with ``force``).

        Inline: returns when each has ended and its event passed the control
        barrier. Background: returns once each has started, waiting for a free
        slot when ``max_evals_in_flight`` are running. Never raises for an
        evaluator.
        """
        due = self.due(step_idx, force=force)
        if not due:
            return
        if self.background:
            tg = self.task_group
            assert tg is not None  # set for the whole train phase
            for ev in due:
                while self.in_flight >= self.max_in_flight:
                    self._slot = slot = anyio.Event()
                    await slot.wait()
                self.in_flight += 1
                tg.start_soon(self._in_background, ev, self._view(), step_idx)
            return
        results: list[Result] = [{}] * len(due)

        async def one(i: int, ev: Evaluator) -> None:
            results[i] = await self._evaluate(ev, self.run.state, step_idx)

        async with anyio.create_task_group() as tg:
            for i, ev in enumerate(due):
                tg.start_soon(one, i, ev)
        for ev, result in zip(due, results, strict=True):
            seq = self._publish(ev, step_idx, result)
            await self.run.barrier.wait(seq, EvalEnded)

    async def finish(self, deadline: Deadline) -> None:
        """Wait for the background evals in flight, until ``deadline``; then cancel them."""
        if not self.in_flight:
            return
        with anyio.move_on_after(deadline.left()):
            while self.in_flight:
                self._slot = slot = anyio.Event()  # a fresh one: set ones don't wait
                await slot.wait()
        self.cancel()

    def cancel(self) -> None:
        """Cancel the background evals still running (the shutdown deadline passed)."""
        if self.in_flight and self.task_group is not None:
            _log.warning(
                "background evals still running at the deadline; cancelled",
                count=self.in_flight,
            )
            self.task_group.cancel_scope.cancel()

    def _view(self) -> LoopState:
        state = self.run.state
        view = copy.copy(state)
        if self.snapshot is not None:
            view.model = self.snapshot(state)
        return view

    async def _in_background(self, ev: Evaluator, view: LoopState, step_idx: int) -> None:
        try:
            self._publish(ev, step_idx, await self._evaluate(ev, view, step_idx))
        finally:
            self.in_flight -= 1
            self._slot.set()

    async def _evaluate(self, ev: Evaluator, state: LoopState, step_idx: int) -> Result:
        try:
            with anyio.fail_after(self.timeout):
                out: object = ev.evaluate(state, step_idx)
                if isinstance(out, Awaitable):
                    out = await out
                metrics = self._reader(ev).read(out, step_idx)
                if isinstance(metrics, Pending):  # values on a device: converted off the loop
                    return await self._converted(metrics)
                return metrics
        except Exception as exc:
            return exc

    def _reader(self, ev: Evaluator) -> MetricReader:
        name = str(ev.name)
        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = MetricReader(f"evaluator {name!r}", strict=self._strict)
        return reader

    async def _converted(self, metrics: Pending) -> dict[str, float]:
        converter = self.run.step_thread.converter
        assert converter is not None  # made when the steps start, before any eval
        return await converter.converted(metrics)

    def _publish(self, ev: Evaluator, step_idx: int, result: Result) -> int | None:
        run = self.run
        name = str(ev.name)
        error = None if isinstance(result, Mapping) else describe(result, timeout=self.timeout)
        self._tally(name, error)
        if error is None:
            return run.emit(EvalEnded, step=step_idx, eval_name=name, metrics=result)
        # expected (a server down, an HTTP status, a timeout): one line; the traceback
        # only at DEBUG (a timeout's is the runtime's cancellation: none at all)
        _log.warning(
            "evaluator failed; training goes on", evaluator=name, step=step_idx, error=error
        )
        if isinstance(result, BaseException) and not isinstance(result, TimeoutError):
            _log.debug(
                "evaluator failure traceback", evaluator=name, step=step_idx, exc_info=result
            )
        return run.emit(EvalFailed, step=step_idx, eval_name=name, error=error)

    def _tally(self, name: str, error: str | None) -> None:
        evals = self.run.artifacts.evals
        tally = evals.get(name) or EvalTally()
        evals[name] = msgspec.structs.replace(
            tally,
            runs=tally.runs + 1,
            failed=tally.failed + (error is not None),
            first_error=tally.first_error or error,
        )
