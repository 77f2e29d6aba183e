"""TrainingLoop: the steps, evaluators and checkpoints of one run, published as events.

The loop knows nothing of any particular callback: each callback becomes one
bus subscriber through :class:`~evsys_async.callbacks._adapter.CallbackAdapter`.
The loop waits only for callbacks that ask it to (``controls_loop``, or every
callback with ``callback_errors="raise"``), after each event they handle, up
to ``control_timeout``. Everything else runs beside training.

This module is the facade: the arguments (checked in ``_arguments.py``), run
directories, the run key, the entry points ``run()`` (on the caller's event
loop, or on one of its own: ``_host.py``) and ``run_sync()``, and what a
service reaches from any thread: ``subscribe``, ``request_stop``, ``cancel``
and ``publish`` (through ``_control.py``). Each ``run()`` fixes its settings in
one frozen :class:`~evsys_async.loop._settings.RunSettings` and hands over to a
:class:`~evsys_async.loop._run.Run` (``_run.py``), whose phases live beside
it (docs/design.md, "A run" and "The shutdown").
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .._util.aio import is_async_callable
from .._util.jsonl import trim_jsonl
from .._util.rundir import claim_run_dir
from .._util.worker import DaemonWorker
from ..bus import EventBus
from ..callbacks._adapter import CallbackAdapter
from ..callbacks.base import Callback
from ..coordinator import Coordinator
from ..evaluators import Evaluator
from ..state import LogContext, LoopArtifacts, LoopState
from ._arguments import check_distinct, check_options, check_steps, context_of, ranks_of
from ._checkpoints import check_state_keys
from ._context import StepContext, ThreadContext, check_step_context
from ._control import RunControl, RunHandle
from ._host import run_on_own_loop
from ._run import Run
from ._runfiles import hparams_of
from ._settings import CheckpointFn, RunSettings, StepFn
from ._step_thread import StepThread

__all__ = ["TrainingLoop"]


class TrainingLoop(RunHandle):
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

    ``strict=True`` (tests, development; the CLI's ``--strict``) turns what is
    otherwise logged and reported into a failed run: a callback's error, a
    metric that is not a number, a logger that lost data.

    ``subscribers`` are handlers subscribed to every run of this loop, with
    :meth:`subscribe`'s defaults (all events, ``Lossless``); :meth:`subscribe`
    takes options. A service stops or cancels a run from any thread with
    :meth:`request_stop` and :meth:`cancel`, and gives the run an event loop of
    its own with ``await loop.run(own_thread=True)`` (docs/guide.md).

    ``step_context`` is a zero-argument callable returning a context manager
    (``lambda: torch.autocast("cuda")``): it is entered, for the whole run, in
    each thread that runs the steps, ``def`` evaluators or a ``def``
    checkpoint function, after the caller's torch state captured at
    ``run()``/``run_sync()`` (docs/guide.md, "Framework state and devices").

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
        rank: int | None = None,
        world_size: int | None = None,
        coordinator: Coordinator | None = None,
        strict: bool = False,
        step_context: StepContext | None = None,
        subscribers: Sequence[Callable[[Any], Any]] | None = None,
    ) -> None:
        check_options(
            step=step,
            num_steps=num_steps,
            save_every=save_every,
            eval_mode=eval_mode,
            callback_errors=callback_errors,
            timeouts={
                "eval_timeout": eval_timeout,
                "control_timeout": control_timeout,
                "drain_timeout": drain_timeout,
            },
            max_evals_in_flight=max_evals_in_flight,
            callbacks=callbacks or (),
            evaluators=evaluators or (),
        )
        check_step_context(step_context)
        ctx, out_dir, key = context_of(ctx, output_dir, run_key, config)
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
        #: how long a callback's events may wait to be handed over as one batch (the
        #: loop's own bus; 20 ms, not 5: each wake costs the step, docs/performance.md)
        self.batch_delay = batch_delay
        self.callback_errors = callback_errors
        self.checkpoint_on_error = checkpoint_on_error
        #: development mode: what is otherwise logged and reported fails the run
        #: (a callback's error, a non-numeric metric, a degraded logger)
        self.strict = strict
        #: entered in each thread that runs the run's code (docs/guide.md)
        self.step_context = step_context
        self.ctx = ctx
        self.rank, self.world_size = ranks_of(rank, world_size, coordinator)
        #: keeps the ranks in step (a stop on one ends every rank after the same step)
        self.coordinator = coordinator
        #: the artifacts of the latest run (also when ``run()`` raised)
        self.artifacts: LoopArtifacts | None = None
        self.state: LoopState | None = None
        self._running = False
        #: stop, cancel and subscribers, from any thread, around the runs
        self._control = RunControl()
        #: the run dir ``claim()`` took for the next run
        self._claimed: Path | None = None
        for handler in subscribers or ():
            self.subscribe(handler)

    # -- entry points ------------------------------------------------------------

    def run_sync(
        self,
        *,
        backend: str = "asyncio",
        num_steps: int | None = None,
        start_step: int = 0,
    ) -> LoopArtifacts:
        """``run()`` from a plain script; returns the artifacts or raises as ``run()``.

        The event loop (bus, ``async def`` callbacks, evaluators) runs in a
        background thread; a ``def`` step runs on the calling thread, so
        thread-local framework state the caller set (``torch.no_grad()``,
        ``torch.device(...)``, autocast) applies inside the step as in a plain
        loop. It works where an event loop already runs in this thread (a
        notebook cell). In the main thread, the first SIGINT/SIGTERM ends the
        run after the current step through the shutdown, then raises
        :class:`~evsys_async._util.signals.Interrupted` (a ``KeyboardInterrupt``;
        ``exit_code`` 130/143); a second leaves at once.
        """
        from .._util.signals import run_beside

        context = ThreadContext.capture(self.step_context)  # here, in the caller's thread
        artifacts: LoopArtifacts = run_beside(
            lambda worker: self._run_checked(num_steps, start_step, worker, context),
            backend=backend,
            name=f"evsys-step:{self._asked_key}",
            enter=context.entered,
        )
        return artifacts

    async def run(
        self, num_steps: int | None = None, start_step: int = 0, *, own_thread: bool = False
    ) -> LoopArtifacts:
        """Run the loop; return the artifacts after the shutdown.

        Re-raises a step's exception, a callback's (``callback_errors="raise"``)
        or an outer cancellation after the shutdown; ``self.artifacts`` then
        holds the report. ``KeyboardInterrupt``/``SystemExit`` raised by the
        step or by an ``async def`` hook end the run as ``cancelled`` through the
        same shutdown, then leave ``run()`` unwrapped. A run ended by
        :meth:`cancel` returns its artifacts (status ``cancelled``). Never
        returns ``None``.

        ``own_thread=True`` runs it on an event loop of its own, in a daemon
        thread the loop owns, on this loop's backend, while this task awaits the
        result without blocking its loop: no work on the caller's loop slows the
        steps (docs/guide.md, "A run on an event loop of its own"). Cancelling
        the awaiting task cancels the run and waits for its shutdown.

        Raises ``RuntimeError`` if this loop is already running, and
        ``ValueError`` if a run with the same key is active on the shared ``bus``
        or ``own_thread`` is asked with a shared ``bus`` (all before the first
        step).
        """
        if own_thread and self.bus is not None:
            raise ValueError(
                "TrainingLoop.run(own_thread=True) runs on an event loop of its own, with a "
                "bus of its own; drop bus= and follow the run with loop.subscribe(...)"
            )
        context = ThreadContext.capture(self.step_context)  # here, in the caller's thread
        total = self._begin(num_steps, start_step)
        try:
            if not own_thread:
                return await self._run_claimed(total, start_step, None, context)
            return await run_on_own_loop(
                lambda: self._run_claimed(total, start_step, None, context, own_thread=True),
                name=f"evsys-run:{self._asked_key}",
                on_cancel=lambda: self.cancel("the task awaiting run() was cancelled"),
            )
        finally:
            self._end()

    async def _run_checked(
        self,
        num_steps: int | None,
        start_step: int,
        worker: DaemonWorker | None,
        context: ThreadContext,
    ) -> LoopArtifacts:
        total = self._begin(num_steps, start_step)
        try:
            return await self._run_claimed(total, start_step, worker, context)
        finally:
            self._end()

    def _begin(self, num_steps: int | None, start_step: int) -> int:
        """The checks before any run; this loop is running from here on."""
        total = self.num_steps if num_steps is None else num_steps
        check_steps(total, start_step)
        check_distinct(self.callbacks)
        if self._running:
            raise RuntimeError(
                "TrainingLoop.run() is already running for this loop; await the first "
                "run, or build a second TrainingLoop for a concurrent run"
            )
        if start_step > 0 and self._claimed is not None:
            raise ValueError(
                f"TrainingLoop: claim() took a new run dir ({str(self._claimed)!r}), but "
                f"start_step={start_step} resumes the existing one; resume without claim()"
            )
        self._running = True
        self._control.begin()
        return total

    def _end(self) -> None:
        self._running = False
        self._control.detach()  # also when the run never started (a refused key)

    async def _run_claimed(
        self,
        total: int,
        start_step: int,
        worker: DaemonWorker | None,
        context: ThreadContext,
        *,
        own_thread: bool = False,
    ) -> LoopArtifacts:
        # the event loop's thread runs def evaluators (and async steps) for the run
        with _claim_run_key(self.bus, self._asked_key), context.entered():
            return await self._run(total, start_step, worker, context, own_thread)

    async def _run(
        self,
        total: int,
        start_step: int,
        worker: DaemonWorker | None,
        context: ThreadContext,
        own_thread: bool,
    ) -> LoopArtifacts:
        state = LoopState(
            num_steps=total,
            output_dir=self.output_dir,
            step=start_step,
            ctx=self.ctx,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.state = state
        self._take_run_dir(start_step)
        run_dir = state.run_dir  # a rank's own, inside the run's
        adapters = [CallbackAdapter(cb, state) for cb in self.callbacks]  # checks hooks
        check_state_keys(self.callbacks)
        artifacts = LoopArtifacts(
            run_dir=run_dir,
            manifest_path=run_dir / "manifest.json",
            total_requested_steps=total,
            steps_completed=0,
            start_step=start_step,
        )
        self.artifacts = artifacts
        settings = self._settings(start_step)
        # one thread for every step of the run, started with the caller's contextvars
        step_thread = StepThread.for_run(
            f"evsys-step:{self.run_key}",
            worker,
            def_step=not is_async_callable(self.step),
            context=context,
        )

        def make(bus: EventBus, owns_bus: bool) -> Run:
            return Run(
                settings,
                state,
                artifacts,
                adapters,
                bus,
                owns_bus=owns_bus,
                step_thread=step_thread,
                control=self._control,
                own_thread=own_thread,
            )

        if self.bus is not None:
            return await make(self.bus, False).execute()
        result: LoopArtifacts | None = None
        async with EventBus(close_timeout=self.drain_timeout, batch_delay=self.batch_delay) as bus:
            result = await make(bus, True).execute()
        if result is None:  # pragma: no cover - the bus swallowed what execute() raised
            raise RuntimeError("TrainingLoop.run(): the run ended without artifacts or an error")
        return result

    def _settings(self, start_step: int) -> RunSettings:
        """This run's settings, fixed: the loop's attributes now, the claimed run key."""
        return RunSettings(
            step=self.step,
            run_key=self.run_key,
            start_step=start_step,
            evaluators=tuple(self.evaluators),
            save_every=self.save_every,
            checkpoint=self.checkpoint,
            eval_mode=self.eval_mode,
            eval_timeout=self.eval_timeout,
            max_evals_in_flight=self.max_evals_in_flight,
            snapshot=self.snapshot,
            control_timeout=self.control_timeout,
            drain_timeout=self.drain_timeout,
            # strict: the first callback error fails the run, as callback_errors="raise"
            callback_errors="raise" if self.strict else self.callback_errors,
            checkpoint_on_error=self.checkpoint_on_error,
            coordinator=self.coordinator,
            strict=self.strict,
            hparams=hparams_of(self.ctx),
        )

    # -- the run directory ------------------------------------------------------------

    def claim(self) -> str:
        """Claim the next run's directory now and return its key (what ``loop.run_key``
        and every event of the run will say), so a service can answer with the key
        before the run starts. ``run()`` then uses that directory; a resume
        (``start_step > 0``) is refused after a claim. Blocks on a ``mkdir``; a
        second call returns the same key. Raises ``RuntimeError`` while running, and
        ``ValueError`` as ``run()`` does for a key that escapes ``output_dir``."""
        if self._running:
            raise RuntimeError("TrainingLoop.claim() while the loop runs: claim before run()")
        if self._claimed is None:
            self._claimed = self._claim_run_dir(0)
        return self.run_key

    def _take_run_dir(self, start_step: int) -> Path:
        """The run's dir: the one ``claim()`` took, else claimed now; a rank other than
        0 also makes its own inside it (``state.run_dir``)."""
        run_dir, self._claimed = self._claimed, None
        if run_dir is None:
            run_dir = self._claim_run_dir(start_step)
        if self.rank > 0:
            (run_dir / f"rank-{self.rank}").mkdir(parents=True, exist_ok=True)
        return run_dir

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
