"""TrainingLoop: the steps, evaluators and checkpoints of one run, published as events.

The loop knows nothing of any particular callback: each callback becomes one
bus subscriber through :class:`~evsys_async.callbacks.base.CallbackAdapter`.
The loop waits only for callbacks that ask it to (``controls_loop``, or every
callback with ``callback_errors="raise"``), after each event they handle, up
to ``control_timeout``. Everything else runs beside training.

Ending (DESIGN rules 14 and 23): whichever way ``run()`` ends — completed,
stopped, a step that raised, cancelled — the shutdown runs shielded under one
``drain_timeout`` deadline: the step in progress, in-flight evals, the last
checkpoint, ``TrainEnded``, a drain until quiet, each callback's teardown,
then the bus (if the loop owns it). A step's exception or an outer
cancellation is re-raised after it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel

from ._async import is_async_callable, shielded
from ._json import trim_jsonl
from ._log import get_logger
from ._resume import check_state_keys, load_callback_states, state_key
from ._rundir import claim_run_dir
from ._traceback import user_traceback
from ._worker import DaemonWorker
from .bus import EventBus, Subscription
from .callbacks.base import Callback, CallbackAdapter
from .errors import describe
from .evaluators import Evaluator, close_evaluators, open_evaluators
from .events import (
    CheckpointSaved,
    EvalEnded,
    EvalFailed,
    Event,
    StepEnded,
    StopRequested,
    TrainEnded,
    TrainStarted,
)
from .state import CallbackHealth, LogContext, LoopArtifacts, LoopState, StepOutput

__all__ = ["TrainingLoop"]

_log = get_logger()

T = TypeVar("T")
StepFn = Callable[[LoopState, int], Any]
CheckpointFn = Callable[[LoopState, str], Any]


class _StepFailed(Exception):
    """Internal: the step (or its metrics) raised; carries the original exception."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class TrainingLoop:
    """Runs ``step(state, step_idx)`` ``num_steps`` times and publishes what happens.

    ``step`` may be ``async def`` (awaited) or ``def`` (run in one dedicated
    daemon thread for the whole run); it returns a metrics mapping or a
    :class:`StepOutput`. Pass ``bus=`` to publish on a bus you own (the loop
    then ends only its own subscriptions); otherwise the loop owns one per run.

    Files go to ``<output_dir>/<run_key>/`` (``output_dir`` defaults to
    ``runs``; ``run_key`` to ``config["name"]``, else ``run``). Every run is
    a new run: when that directory holds another run's files the run takes
    ``<run_key>-1``, ``-2``, ... (``loop.run_key`` and ``TrainStarted`` say
    which) unless ``overwrite=True`` (start it afresh) or it resumes
    (``start_step > 0``). ``config`` is the run's hyperparameters, a mapping
    hooks and steps read as ``state.ctx.run_config``.

    ``batch_delay`` (20 ms) bounds how long a callback's events wait to be handed
    over as one batch while steps flow; barriers and ``controls_loop`` callbacks
    are served at once.

    Raises ``ValueError`` for bad arguments, naming the allowed range, and for
    arguments that contradict ``ctx`` (its ``output_dir``, ``run_key`` or
    ``run_config``).
    """

    def __init__(
        self,
        step: StepFn,
        *,
        num_steps: int,
        output_dir: str | os.PathLike[str] | None = None,
        run_key: str = "",
        config: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        evaluators: Sequence[Evaluator] | None = None,
        callbacks: Sequence[Callback] | None = None,
        bus: EventBus | None = None,
        save_every: int = 0,
        checkpoint: CheckpointFn | None = None,
        eval_mode: Literal["inline", "background"] = "inline",
        eval_timeout: float = 300.0,
        max_evals_in_flight: int = 2,
        snapshot: Callable[[LoopState], Any] | None = None,
        control_timeout: float = 10.0,
        drain_timeout: float = 60.0,
        batch_delay: float = 0.02,
        callback_errors: Literal["log", "raise"] = "log",
        checkpoint_on_error: bool = True,
        ctx: LogContext | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not callable(step):
            raise TypeError(f"TrainingLoop: step must be callable (state, step_idx), got {step!r}")
        _check_steps(num_steps, 0)
        if save_every < 0:
            raise ValueError(f"TrainingLoop: save_every must be >= 0 (0 = never), got {save_every}")
        if eval_mode not in ("inline", "background"):
            raise ValueError(
                f"TrainingLoop: eval_mode must be 'inline' or 'background', got {eval_mode!r}"
            )
        if callback_errors not in ("log", "raise"):
            raise ValueError(
                f"TrainingLoop: callback_errors must be 'log' or 'raise', got {callback_errors!r}"
            )
        for name, value in (
            ("eval_timeout", eval_timeout),
            ("control_timeout", control_timeout),
            ("drain_timeout", drain_timeout),
        ):
            if value <= 0:
                raise ValueError(f"TrainingLoop: {name} must be > 0 seconds, got {value}")
        if max_evals_in_flight < 1:
            raise ValueError(
                f"TrainingLoop: max_evals_in_flight must be >= 1, got {max_evals_in_flight}"
            )
        _check_distinct(callbacks or ())
        for i, ev in enumerate(evaluators or ()):
            if not (hasattr(ev, "name") and hasattr(ev, "evaluate")):
                raise TypeError(
                    f"TrainingLoop: evaluators[{i}] ({ev!r}) needs `name`, `run_every` and "
                    "`async def evaluate(state, step_idx)`"
                )
        ctx, out_dir, key = _context(ctx, output_dir, run_key, config)
        self.step = step
        self.num_steps = num_steps
        self.output_dir = out_dir
        #: the run key: as asked until ``run()`` claims the run dir, then the claimed one
        self.run_key = key
        self._asked_key = key
        self.overwrite = overwrite
        self.evaluators = list(evaluators or ())
        self.callbacks = list(callbacks or ())
        self.bus = bus
        self.save_every = save_every
        self.checkpoint = checkpoint
        self.eval_mode = eval_mode
        self.eval_timeout = eval_timeout
        self.max_evals_in_flight = max_evals_in_flight
        self.snapshot = snapshot
        self.control_timeout = control_timeout
        self.drain_timeout = drain_timeout
        #: how long a callback's events may wait to be handed over as one batch while
        #: steps flow (barriers, controls_loop and a lone event on an idle bus go at
        #: once); only for the bus the loop owns. 20 ms, not the bus's 5: each wake of
        #: a subscriber costs the loop ~6-10 us, and on a sleeping step every
        #: microsecond of loop work adds to the step (docs/performance.md)
        self.batch_delay = batch_delay
        self.callback_errors = callback_errors
        self.checkpoint_on_error = checkpoint_on_error
        self.ctx = ctx
        self.rank = rank
        self.world_size = world_size
        #: the artifacts of the latest run (also when ``run()`` raised)
        self.artifacts: LoopArtifacts | None = None
        self.state: LoopState | None = None
        self._running = False

    # -- entry points ------------------------------------------------------------

    def run_sync(
        self,
        *,
        backend: str = "asyncio",
        num_steps: int | None = None,
        start_step: int = 0,
    ) -> LoopArtifacts:
        """``run()`` from a plain script: SIGINT/SIGTERM cancel the run cleanly."""
        from ._signals import run_with_signals

        artifacts: LoopArtifacts = run_with_signals(
            lambda: self.run(num_steps=num_steps, start_step=start_step), backend=backend
        )
        return artifacts

    async def run(self, num_steps: int | None = None, start_step: int = 0) -> LoopArtifacts:
        """Run the loop; return the artifacts after the shutdown.

        Re-raises a step's exception, a callback's (``callback_errors="raise"``)
        or an outer cancellation after the shutdown; ``self.artifacts`` then
        holds the report. ``KeyboardInterrupt``/``SystemExit`` raised by the
        step or by an ``async def`` hook end the run as ``cancelled`` through the
        same shutdown, then leave ``run()`` unwrapped. Never returns ``None``.

        Raises ``RuntimeError`` if this loop is already running, and
        ``ValueError`` if a run with the same key is active on the shared ``bus``
        (both before the first step).
        """
        total = self.num_steps if num_steps is None else num_steps
        _check_steps(total, start_step)
        _check_distinct(self.callbacks)
        if self._running:
            raise RuntimeError(
                "TrainingLoop.run() is already running for this loop; await the first "
                "run, or build a second TrainingLoop for a concurrent run"
            )
        self._running = True
        try:
            with _claim_run_key(self.bus, self._asked_key):
                return await self._run(total, start_step)
        finally:
            self._running = False

    async def _run(self, total: int, start_step: int) -> LoopArtifacts:
        state = LoopState(
            num_steps=total,
            output_dir=self.output_dir,
            step=start_step,
            ctx=self.ctx,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.state = state
        run_dir = self._claim_run_dir(start_step)
        adapters = [CallbackAdapter(cb, state) for cb in self.callbacks]  # checks hooks
        check_state_keys(self.callbacks)
        artifacts = LoopArtifacts(
            run_dir=run_dir,
            manifest_path=run_dir / "manifest.json",
            total_requested_steps=total,
            steps_completed=0,
        )
        self.artifacts = artifacts
        if self.bus is not None:
            return await _Run(self, state, artifacts, adapters, self.bus, start_step).execute()
        result: LoopArtifacts | None = None
        async with EventBus(close_timeout=self.drain_timeout, batch_delay=self.batch_delay) as bus:
            run = _Run(self, state, artifacts, adapters, bus, start_step)
            run.owns_bus = True
            result = await run.execute()
        if result is None:  # pragma: no cover - the bus swallowed what execute() raised
            raise RuntimeError("TrainingLoop.run(): the run ended without artifacts or an error")
        return result

    def _claim_run_dir(self, start_step: int) -> Path:
        """Claim the run dir (every run is a new run); the claimed key is the run key."""
        key, run_dir = claim_run_dir(
            self.output_dir,
            self._asked_key,
            overwrite=self.overwrite,
            resume=start_step > 0,
            fixed=self.world_size > 1,
            owner=self.rank == 0,
        )
        self.run_key = self.ctx.run_key = key
        if start_step > 0 and self.rank == 0:  # those steps are written again
            trim_jsonl(run_dir / "checkpoints.jsonl", start_step)
        return run_dir


#: run keys of the runs active on each shared bus (one key, one run: events are
#: filtered by run key, so two runs with one key would see each other's events)
_ACTIVE_KEYS: weakref.WeakKeyDictionary[EventBus, set[str]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _claim_run_key(bus: EventBus | None, run_key: str) -> Iterator[None]:
    if bus is None:  # the loop's own bus carries this run only
        yield
        return
    active = _ACTIVE_KEYS.setdefault(bus, set())
    if run_key in active:
        raise ValueError(
            f"TrainingLoop: a run with run_key={run_key!r} is already active on this bus; "
            "give each concurrent run its own run_key"
        )
    active.add(run_key)
    try:
        yield
    finally:
        active.discard(run_key)


def _check_distinct(callbacks: Sequence[Callback]) -> None:
    """One callback instance subscribes once: twice would interleave its own calls."""
    seen: dict[int, int] = {}
    for i, cb in enumerate(callbacks):
        j = seen.setdefault(id(cb), i)
        if j != i:
            raise ValueError(
                f"TrainingLoop: callbacks[{i}] is the same {type(cb).__name__} instance as "
                f"callbacks[{j}]; pass one instance per subscription (build it twice)"
            )

def _context(
    ctx: LogContext | None,
    output_dir: str | os.PathLike[str] | None,
    run_key: str,
    config: Mapping[str, Any] | None,
) -> tuple[LogContext, Path, str]:
    """The run's context, output dir and asked-for key; refuses contradictions."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(
            f"TrainingLoop: config must be a mapping of hyperparameters, got {config!r}"
        )
    if ctx is None:
        ctx = LogContext(output_dir=Path(output_dir if output_dir is not None else "runs"))
    else:
        if output_dir is not None and Path(output_dir) != Path(ctx.output_dir):
            raise ValueError(
                f"TrainingLoop: output_dir={str(output_dir)!r} contradicts "
                f"ctx.output_dir={str(ctx.output_dir)!r}; give it once (without output_dir "
                "the loop uses the ctx's)"
            )
        if run_key and ctx.run_key and run_key != ctx.run_key:
            raise ValueError(
                f"TrainingLoop: run_key={run_key!r} contradicts ctx.run_key={ctx.run_key!r}; "
                "give it once"
            )
        if config is not None and ctx.run_config and dict(config) != dict(ctx.run_config):
            raise ValueError(
                "TrainingLoop: config= and ctx.run_config hold different hyperparameters; "
                "give them once (config= is enough for a single run)"
            )
    if config is not None:
        ctx.run_config = dict(config)
    name = config.get("name") if config is not None else None
    key = run_key or ctx.run_key or (name if isinstance(name, str) and name else "") or "run"
    ctx.run_key = key
    return ctx, Path(ctx.output_dir if output_dir is None else output_dir), key


def _check_steps(num_steps: int, start_step: int) -> None:
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not isinstance(start_step, int) or not 0 <= start_step < num_steps:
        raise ValueError(
            f"start_step must be in [0, {num_steps - 1}] for num_steps={num_steps}, "
            f"got {start_step!r}"
        )


class _Run:
    """One execution of a loop: the state it mutates and its shutdown."""

    def __init__(
        self,
        loop: TrainingLoop,
        state: LoopState,
        artifacts: LoopArtifacts,
        adapters: list[CallbackAdapter],
        bus: EventBus,
        start_step: int,
    ) -> None:
        self.loop = loop
        self.state = state
        self.artifacts = artifacts
        self.adapters = adapters
        self.bus = bus
        self.start_step = start_step
        self.run_key = loop.run_key
        state.eval_names = tuple(str(ev.name) for ev in loop.evaluators)
        state.start_step = start_step
        self.owns_bus = False
        self.subs: list[Subscription] = []
        self.worker: DaemonWorker | None = None
        self.evals_in_flight = 0
        self.eval_tg: Any = None
        self.raise_callbacks = loop.callback_errors == "raise"
        self.callback_error: BaseException | None = None
        self.failed_seen: dict[str, int] = {}
        self._barriers: dict[type[Event], list[tuple[CallbackAdapter, Subscription]]] = {}
        self._deadline = math.inf  # the shutdown's one deadline (rule 23)
        self._shutdown_started = 0.0
        self._eval_slot: anyio.Event
        #: KeyboardInterrupt/SystemExit from one of this run's async hooks
        self.interrupted: BaseException | None = None
        self._train_scope = anyio.CancelScope()

    def on_interrupt(self, exc: BaseException) -> None:
        """An ``async def`` hook raised ``KeyboardInterrupt``/``SystemExit``: the run
        ends as ``cancelled`` after the current step and re-raises it at the end."""
        if self.interrupted is None:
            self.interrupted = exc
        self._train_scope.cancel()

    def publish(self, event: Event) -> int | None:
        """``state.publish``: a user's event, stamped with the run key (a copy: frozen)."""
        if self.run_key and not event.run_key:
            event = replace_run_key(event, self.run_key)
        return self.bus.publish(event)

    def emit(self, cls: type[Event], **fields: Any) -> int | None:
        """Publish one of the loop's own events, built with the run key (no copy)."""
        return self.bus.publish(cls(run_key=self.run_key, **fields))

    async def execute(self) -> LoopArtifacts:
        state, artifacts = self.state, self.artifacts
        state._publish = self.publish
        for adapter in self.adapters:
            self.subs.append(
                adapter.subscribe(
                    self.bus, run_key=self.run_key or None, on_interrupt=self.on_interrupt
                )
            )
        self._load_callback_states()
        self._eval_slot = anyio.Event()
        status, raised = "failed", None
        try:
            async with anyio.create_task_group() as eval_tg:
                self.eval_tg = eval_tg
                with self._train_scope:
                    await open_evaluators(
                        self.loop.evaluators, state, timeout=self.loop.eval_timeout
                    )
                    status, raised = await self._train()
                if self.interrupted is not None:
                    status, raised = "cancelled", self.interrupted
                self._start_shutdown_clock()  # in-flight evals are part of the shutdown
                await self._finish_background_evals(self._deadline)
        except BaseException as exc:  # cancelled from outside, or a bug surfacing
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            raised = exc
            if isinstance(exc, anyio.get_cancelled_exc_class() | KeyboardInterrupt | SystemExit):
                status = "cancelled"
            else:
                status = "failed"
                artifacts.error = describe(exc)
        if raised is None and self.callback_error is not None:
            raised = self.callback_error
            status = "failed"
            artifacts.error = describe(raised)
        await shielded(self._shutdown(status))  # also through a native asyncio cancel
        if self.interrupted is not None and raised is not self.interrupted:
            raised = self.interrupted  # from a hook during the shutdown (on_train_end)
        if raised is not None:
            raise raised
        return artifacts

    # -- the steps ---------------------------------------------------------------

    async def _train(self) -> tuple[str, BaseException | None]:
        """TrainStarted, the steps; a step's failure ends it as ``failed``."""
        state, artifacts = self.state, self.artifacts
        seq = self.emit(
            TrainStarted,
            num_steps=state.num_steps,
            start_step=self.start_step,
            output_dir=str(state.run_dir),
        )
        await self._control_barrier(seq, TrainStarted)
        if self.callback_error is not None:  # callback_errors="raise": before step 0
            return "failed", None
        t_start = time.perf_counter()  # rule 14: first step to last step
        try:
            return await self._steps(), None
        except _StepFailed as exc:
            artifacts.error = describe(exc.original)
            artifacts.traceback = user_traceback(exc.original)
            return "failed", exc.original
        finally:
            artifacts.train_seconds = time.perf_counter() - t_start

    async def _steps(self) -> str:
        loop, state = self.loop, self.state
        step_is_async = is_async_callable(loop.step)
        if not step_is_async:
            self.worker = DaemonWorker(f"evsys-step:{self.run_key or 'run'}")
        wanting_batch = [a for a in self.adapters if getattr(a.callback, "wants_batch", False)]
        num_steps = state.num_steps
        for step_idx in range(self.start_step, num_steps):
            state.step = step_idx
            try:
                if step_is_async:
                    out = await loop.step(state, step_idx)
                else:
                    out = await self.worker.call(loop.step, state, step_idx)  # type: ignore[union-attr]
                metrics, batch = _metrics_of(out, step_idx)
            except Exception as exc:
                raise _StepFailed(exc) from exc
            self.artifacts.steps_completed = step_idx + 1 - self.start_step
            for adapter in wanting_batch:
                adapter.offer_batch(step_idx, batch)
            seq = self.emit(StepEnded, step=step_idx, num_steps=num_steps, metrics=metrics)
            await self._control_barrier(seq, StepEnded)
            names, wants_eval = state._take_requests()
            await self._evals(step_idx, force=wants_eval)
            if loop.checkpoint is not None:
                if loop.save_every and (step_idx + 1) % loop.save_every == 0:
                    names.insert(0, f"step_{step_idx + 1}")
                for name in names:
                    await self._save_checkpoint(step_idx, name)
            if self.callback_error is not None:
                return "failed"
            if state.stop_requested:
                seq = self.emit(
                    StopRequested, step=step_idx, reason=state.stop_reason, source=state.stop_source
                )
                await self._control_barrier(seq, StopRequested)
                return "failed" if state.stop_failed else "stopped"
            await anyio.lowlevel.checkpoint()  # rule 10: subscribers and cancel make progress
        return "completed"

    async def _control_barrier(self, seq: int | None, event_type: type[Event]) -> None:
        """Wait for controlling callbacks that handle ``event_type`` to handle ``seq``."""
        if seq is None:
            return
        waited = self._barriers.get(event_type)
        if waited is None:  # fixed per event type for the run: computed once
            waited = self._barriers[event_type] = [
                (a, s)
                for a, s in zip(self.adapters, self.subs, strict=True)
                if (self.raise_callbacks or a.controls_loop) and a.handles(event_type)
            ]
        if not waited:
            return
        deadline = time.monotonic() + self.loop.control_timeout
        for adapter, sub in waited:
            if not await sub.wait(seq, max(0.0, deadline - time.monotonic())):
                adapter.control_timeouts += 1
                _log.warning(
                    "control callback did not keep up; the loop goes on",
                    callback=adapter.name,
                    event_type=event_type.__name__,
                    control_timeout=self.loop.control_timeout,
                )
            if self.raise_callbacks:
                st = sub.stats()
                failed = st.failed + st.hook_failures
                if failed > self.failed_seen.get(sub.name, 0) and self.callback_error is None:
                    self.callback_error = sub.last_error
                self.failed_seen[sub.name] = failed

    # -- evaluators --------------------------------------------------------------

    async def _evals(self, step_idx: int, *, force: bool = False) -> None:
        due = [
            ev
            for ev in self.loop.evaluators
            if force
            or ((every := int(getattr(ev, "run_every", 0))) and (step_idx + 1) % every == 0)
        ]
        if not due:
            return
        if self.loop.eval_mode == "background":
            for ev in due:
                while self.evals_in_flight >= self.loop.max_evals_in_flight:
                    self._eval_slot = slot = anyio.Event()  # set when an eval finishes
                    await slot.wait()
                self.evals_in_flight += 1
                view = self._snapshot_state()
                self.eval_tg.start_soon(self._background_eval, ev, view, step_idx)
            return
        results: dict[int, Mapping[str, float] | BaseException] = {}
        async with anyio.create_task_group() as tg:
            for i, ev in enumerate(due):
                tg.start_soon(self._run_eval, ev, self.state, step_idx, results, i)
        for i, ev in enumerate(due):
            seq = self._publish_eval(ev, step_idx, results[i])
            await self._control_barrier(seq, EvalEnded)

    def _snapshot_state(self) -> LoopState:
        view = copy.copy(self.state)
        if self.loop.snapshot is not None:
            view.model = self.loop.snapshot(self.state)
        return view

    async def _background_eval(self, ev: Evaluator, view: LoopState, step_idx: int) -> None:
        results: dict[int, Mapping[str, float] | BaseException] = {}
        try:
            await self._run_eval(ev, view, step_idx, results, 0)
            self._publish_eval(ev, step_idx, results[0])
        finally:
            self.evals_in_flight -= 1
            self._eval_slot.set()

    async def _run_eval(
        self,
        ev: Evaluator,
        state: LoopState,
        step_idx: int,
        results: dict[int, Mapping[str, float] | BaseException],
        i: int,
    ) -> None:
        try:
            with anyio.fail_after(self.loop.eval_timeout):
                out: Any = ev.evaluate(state, step_idx)
                if isinstance(out, Awaitable):
                    out = await out
            results[i] = _floats(out, f"evaluator {ev.name!r}")
        except Exception as exc:
            results[i] = exc

    def _publish_eval(
        self, ev: Evaluator, step_idx: int, result: Mapping[str, float] | BaseException
    ) -> int | None:
        if isinstance(result, BaseException):
            error = describe(result, timeout=self.loop.eval_timeout)
            _log.warning(
                "evaluator failed; training goes on",
                evaluator=ev.name,
                step=step_idx,
                error=error,
                # a timeout is one line: its traceback is the runtime's cancellation
                exc_info=None if isinstance(result, TimeoutError) else result,
            )
            return self.emit(EvalFailed, step=step_idx, eval_name=ev.name, error=error)
        return self.emit(EvalEnded, step=step_idx, eval_name=ev.name, metrics=dict(result))

    async def _finish_background_evals(self, deadline: float) -> None:
        if not self.evals_in_flight:
            return
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            while self.evals_in_flight:
                self._eval_slot = slot = anyio.Event()  # a fresh one: set ones don't wait
                await slot.wait()
        if self.evals_in_flight:
            _log.warning(
                "background evals still running at the deadline; cancelled",
                count=self.evals_in_flight,
            )
            self.eval_tg.cancel_scope.cancel()

    # -- checkpoints and callback state ------------------------------------------

    async def _save_checkpoint(self, step_idx: int, name: str) -> None:
        fn = self.loop.checkpoint
        assert fn is not None
        await self._save_callback_states()
        if is_async_callable(fn):
            result = await fn(self.state, name)
        else:
            if self.worker is None:
                self.worker = DaemonWorker(f"evsys-step:{self.run_key or 'run'}")
            result = await self.worker.call(fn, self.state, name)
        row: dict[str, Any] = {"step": step_idx, "name": name, "ts": time.time()}
        path: str | None = None
        if isinstance(result, str | os.PathLike):
            path = str(result)
        elif isinstance(result, Mapping):
            row.update(result)
            path = str(result["path"]) if result.get("path") is not None else None
        row["path"] = path
        row["steps_completed"] = self.artifacts.steps_completed
        self.artifacts.checkpoints.append(row)
        if self.state.rank == 0:
            _append_line(self.state.run_dir / "checkpoints.jsonl", json.dumps(row, default=str))
        seq = self.emit(CheckpointSaved, step=step_idx, name=name, path=path, row=row)
        await self._control_barrier(seq, CheckpointSaved)

    async def _save_callback_states(self) -> None:
        stateful = [
            (a, s)
            for a, s in zip(self.adapters, self.subs, strict=True)
            if callable(getattr(a.callback, "state_dict", None))
        ]
        if not stateful or self.state.rank != 0:
            return
        last = self.bus.last_seq
        states: dict[str, Any] = {}
        for adapter, sub in stateful:
            with anyio.move_on_after(self.loop.control_timeout) as scope:
                await sub.wait(last)
                try:  # in the callback's own thread, between its batches
                    key = state_key(adapter.callback)  # stable across reorders (docs/guide.md)
                    states[key] = await sub.call(adapter.callback.state_dict)  # type: ignore[attr-defined]
                except Exception as exc:
                    _log.warning("state_dict failed", callback=adapter.name, error=repr(exc))
            if scope.cancelled_caught:
                _log.warning(
                    "state_dict skipped: the callback did not catch up in time",
                    callback=adapter.name,
                    control_timeout=self.loop.control_timeout,
                )
        _write_json_atomic(self.state.run_dir / "callbacks_state.json", states)

    def _load_callback_states(self) -> None:
        if self.start_step > 0:
            path = self.state.run_dir / "callbacks_state.json"
            load_callback_states(path, [a.callback for a in self.adapters])

    # -- shutdown ----------------------------------------------------------------

    def _start_shutdown_clock(self) -> None:
        if self._deadline == math.inf:
            self._shutdown_started = time.perf_counter()
            self._deadline = time.monotonic() + self.loop.drain_timeout

    async def _shutdown(self, status: str) -> None:
        """Rule 23, in order, under one ``drain_timeout`` deadline (runs shielded)."""
        loop, state, artifacts = self.loop, self.state, self.artifacts
        self._start_shutdown_clock()
        started, deadline = self._shutdown_started, self._deadline

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if self.worker is not None:
            with anyio.move_on_after(left()):
                await self.worker.wait_idle()  # a def step cannot be cancelled: await it
        if self.evals_in_flight and self.eval_tg is not None:
            self.eval_tg.cancel_scope.cancel()
        await close_evaluators(loop.evaluators, timeout=left())  # after in-flight evals
        if loop.checkpoint is not None and (
            status in ("completed", "stopped") or loop.checkpoint_on_error
        ):
            name = "final" if status in ("completed", "stopped") else "interrupted"
            with anyio.move_on_after(left()):
                try:
                    await self._save_checkpoint(max(state.step, 0), name)
                except Exception as exc:
                    _log.warning("final checkpoint failed", name=name, error=repr(exc))
        if self.worker is not None:
            self.worker.close()
        artifacts.status = status
        artifacts.stop_reason = state.stop_reason
        state.artifacts = replace(artifacts, checkpoints=list(artifacts.checkpoints))
        self.emit(
            TrainEnded,
            status=status,
            steps_completed=artifacts.steps_completed,
            num_steps=state.num_steps,
            stop_reason=state.stop_reason,
            train_seconds=artifacts.train_seconds,
            error=artifacts.error,
        )
        # keep the deadline's tail for teardowns, so one stuck callback cannot leave
        # its healthy siblings' files open (rule 27)
        reserve = min(1.0, 0.2 * loop.drain_timeout)
        # on a caller's bus, wait for this run's callbacks only, not other runs'
        mine = None if self.owns_bus else self.subs
        report = await self.bus.drain(max(0.0, left() - reserve), subscriptions=mine)
        closed = [True] * len(self.subs)

        async def close(i: int, sub: Subscription) -> None:
            closed[i] = await sub.aclose(left())

        async with anyio.create_task_group() as tg:
            for i, sub in enumerate(self.subs):
                tg.start_soon(close, i, sub)
        health: dict[str, CallbackHealth] = {}
        for adapter, sub, ok in zip(self.adapters, self.subs, closed, strict=True):
            st = sub.stats()
            health[adapter.name] = CallbackHealth(
                delivered=st.delivered,
                failed=st.failed,
                dropped=st.dropped,
                pending=report.pending.get(sub.name, 0) if not ok else 0,
                stuck=sub.stuck or not ok,
                control_timeouts=adapter.control_timeouts,
                coalesced=st.coalesced,
                # a callback that switched itself off says why (docs/callbacks.md)
                disabled=getattr(adapter.callback, "disabled_reason", None),
            )
        short = {n: h.pending for n, h in health.items() if h.pending or h.stuck}
        if short:
            _log.warning("drain deadline passed; callbacks left behind", callbacks=short)
        artifacts.callback_report = health
        if self.owns_bus:
            self.bus.close_timeout = left()  # one deadline covers the bus's close too
        artifacts.drain_seconds = time.perf_counter() - started
        state._publish = None
        if state.rank == 0 and artifacts.manifest_path is not None:
            _write_json_atomic(artifacts.manifest_path, _manifest(artifacts, self.run_key))
            if artifacts.traceback:  # the failed step's traceback stays with the run
                _write_text(state.run_dir / "error.txt", artifacts.traceback)


def replace_run_key(event: Event, run_key: str) -> Event:
    """A copy of ``event`` stamped with ``run_key`` (events are frozen)."""
    import msgspec

    return msgspec.structs.replace(event, run_key=run_key)


def _floats(values: Any, what: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must return a mapping of metric name to number, got {values!r}")
    out: dict[str, float] = {}
    for key, value in values.items():
        try:
            out[str(key)] = float(value)  # a tensor syncs here, once
        except (TypeError, ValueError):
            raise TypeError(
                f"{what} returned metric {key!r} = {value!r}, which is not a number; "
                "return floats (or 0-d tensors)"
            ) from None
    return out


def _metrics_of(out: Any, step_idx: int) -> tuple[dict[str, float], Any]:
    what = f"step {step_idx}"
    if isinstance(out, StepOutput):
        return _floats(out.metrics, what), out.batch
    if out is None:
        return {}, None
    return _floats(out, what), None


def _manifest(artifacts: LoopArtifacts, run_key: str) -> dict[str, Any]:
    import msgspec

    return {
        "run_key": run_key,
        "status": artifacts.status,
        "steps_completed": artifacts.steps_completed,
        "total_requested_steps": artifacts.total_requested_steps,
        "stop_reason": artifacts.stop_reason,
        "error": artifacts.error,
        "train_seconds": artifacts.train_seconds,
        "drain_seconds": artifacts.drain_seconds,
        "checkpoints": artifacts.checkpoints,
        "callback_report": msgspec.to_builtins(artifacts.callback_report),
    }


def _write_text(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(text, encoding="utf-8")


def _append_line(path: Path, line: str) -> None:
    # one short line per checkpoint: cheaper inline than a thread hop
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, path)
