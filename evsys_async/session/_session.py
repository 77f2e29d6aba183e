"""Session: the bus, the callbacks and their isolation for a trainer that is not ours.

A hand-written loop, Lightning or Hugging Face's ``Trainer`` runs the steps;
the session is the run around them (docs/design.md, "A session"):

* ``with Session(...)`` (a plain script, a trainer's callback) runs the bus on
  an event loop in a daemon thread of its own (``evsys-session:<key>``);
  ``async with`` runs it on the caller's event loop, as tasks;
* :meth:`Session.step_ended`, :meth:`eval_ended` and :meth:`checkpoint_saved`
  publish, from any thread, and never wait;
* :attr:`Session.should_stop` is the loop's step boundary: it says whether a
  callback asked to stop (with ranks, whether the ranks agreed to stop here).
  When a ``controls_loop`` callback handles what was published since the last
  check, it waits for that callback first (at most ``control_timeout``), so a
  stop it asked on step k's event is seen by the check after step k;
* leaving the block is the loop's shutdown: ``TrainEnded``, the drain, each
  callback's ``teardown``, the callback report and ``manifest.json``, within
  ``drain_timeout``; :attr:`Session.artifacts` holds the
  :class:`~evsys_async.state.LoopArtifacts` a run returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import anyio.from_thread
import anyio.lowlevel

from .._util.jsonl import trim_jsonl
from .._util.log import get_logger
from .._util.paths import expand_path
from .._util.rundir import claim_run_dir
from .._util.traceback import user_traceback
from ..bus import EventBus
from ..callbacks._adapter import CallbackAdapter
from ..coordinator import Coordinator
from ..errors import describe
from ..events import CheckpointSaved, EvalEnded, Event
from ..events._frozen import FrozenDict
from ..loop._checkpoints import check_state_keys
from ..loop._metrics import MetricReader
from ..loop._runfiles import write_hparams
from ..loop._settings import RunSettings
from ..state import LogContext, LoopArtifacts, LoopState, Status
from ._arguments import callbacks_of, check_options, hparams, ranks_of
from ._run import SessionRun, no_step
from ._thread import LoopJobs, SessionThread

__all__ = ["Session"]

_log = get_logger()

#: beyond ``drain_timeout``, how long leaving a ``with`` session waits for its thread
_JOIN_MARGIN = 5.0


class Session:
    """The run around a trainer's steps: callbacks as isolated bus subscribers, a run
    directory, a report (see the module docstring).

    ``callbacks`` are callback instances, kind names (``"csv_metrics"``),
    ``{kind, params, isolation}`` specs or ``CallbackSpec``s. Files go to
    ``<output_dir>/<run_key>/``, claimed as a run claims it (``<run_key>-1``
    when it holds another run's files, unless ``overwrite``; reused as it is
    when ``start_step > 0``); :attr:`run_key` is the key claimed. ``config`` is
    the run's hyperparameters (``TrainStarted.config``, ``ctx.run_config``).
    ``num_steps`` is the number of steps the trainer will take (0: not known).
    ``coordinator`` keeps ranks in step (``TorchDistributedCoordinator`` under
    torchrun): every rank's ``should_stop`` says stop after the same step.
    ``backend`` is the event loop of a ``with`` session (``"asyncio"`` or
    ``"trio"``); ``async with`` uses the caller's. ``batch_delay`` is how long
    an event may wait to reach the callbacks in a batch with the ones after it
    (0.1 s, five times a loop's): each hand-over wakes threads that take the
    GIL from the trainer, so a session makes few, large ones (docs/trainers.md,
    "What it costs"). A stop check and the end never wait for it.

    Raises ``ValueError``/``TypeError`` for bad arguments, naming the argument
    and the fix, and ``ConfigError`` for a bad callback spec, all before
    anything starts.
    """

    def __init__(
        self,
        callbacks: Sequence[Any] | None = None,
        *,
        output_dir: str | Path = "runs",
        run_key: str = "",
        config: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        num_steps: int = 0,
        start_step: int = 0,
        control_timeout: float = 10.0,
        drain_timeout: float = 60.0,
        batch_delay: float = 0.1,
        callback_errors: Literal["log", "raise"] = "log",
        strict: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        coordinator: Coordinator | None = None,
        backend: str = "asyncio",
    ) -> None:
        check_options(
            config=config,
            num_steps=num_steps,
            start_step=start_step,
            callback_errors=callback_errors,
            timeouts={"control_timeout": control_timeout, "drain_timeout": drain_timeout},
            batch_delay=batch_delay,
        )
        self.callbacks = callbacks_of(callbacks)
        self.output_dir = expand_path(output_dir, what="Session(output_dir=...)")
        name = config.get("name") if config is not None else None
        #: the run key: as asked until the session starts, then the one it claimed
        self.run_key = run_key or (name if isinstance(name, str) and name else "") or "run"
        self.config = dict(config) if config is not None else {}
        self.overwrite = overwrite
        self.num_steps = num_steps
        self.start_step = start_step
        self.control_timeout = control_timeout
        self.drain_timeout = drain_timeout
        self.batch_delay = batch_delay
        #: strict: the first callback error fails the run (as ``callback_errors="raise"``)
        self.callback_errors: Literal["log", "raise"] = "raise" if strict else callback_errors
        self.strict = strict
        self.coordinator = coordinator
        self.rank, self.world_size = ranks_of(rank, world_size, coordinator)
        self.backend = backend
        #: the live state callbacks see (``state.model`` may be set for in-process ones)
        self.state = LoopState(
            num_steps=num_steps,
            output_dir=self.output_dir,
            step=start_step,
            ctx=LogContext(output_dir=self.output_dir, run_key=self.run_key),
            rank=self.rank,
            world_size=self.world_size,
        )
        self.state.ctx.run_config = dict(self.config)
        #: what the run leaves behind: set when it starts, complete once it has ended
        self.artifacts: LoopArtifacts | None = None
        self._run: SessionRun | None = None
        self._thread: SessionThread | None = None
        self._stack: AsyncExitStack | None = None
        self._jobs: LoopJobs | None = None
        self._ended: anyio.Event | None = None
        self._adapters: list[CallbackAdapter] = []
        self._final: Status = "completed"
        self._loop_ident: int | None = None
        self._token: Any = None
        self._last_step = start_step - 1
        self._started = 0.0
        #: event types a steering callback handles, published since the last check
        self._steered: set[type[Event]] = set()
        self._verdict: Status | None = None
        self._check_lock = threading.Lock()
        #: the step metrics' reader and each evaluation's (the loop's rule)
        self._reader = MetricReader("Session.step_ended", strict=strict)
        self._eval_readers: dict[str, MetricReader] = {}
        self._state = "new"  # new -> starting -> open -> ended

    @property
    def stop_rank(self) -> int | None:
        """With ranks: the rank whose stop request (or failure) ended every rank, once
        the ranks agreed (``TrainEnded.stop_rank``); else ``None``."""
        return None if self._run is None else self._run.stop_rank

    @property
    def run_dir(self) -> Path:
        """Where the run's files go: ``<output_dir>/<run_key>``."""
        return self.state.run_dir

    # -- the trainer's side: publish, never wait ----------------------------------------

    def step_ended(
        self, step: int, metrics: Mapping[str, Any] | None = None, *, batch: Any = None
    ) -> None:
        """Step ``step`` (0-based) ended with ``metrics``: ``StepEnded`` to every callback.

        From any thread; never waits. Metric values are converted to floats here
        (numbers, numpy scalars, 0-d tensors). ``batch`` goes to ``wants_batch``
        callbacks, out of band. Raises ``TypeError`` for a metric that is not a
        number (nothing is published then) and ``RuntimeError`` outside the block.
        """
        run = self._open_run("step_ended")
        values = self._reader.read({} if metrics is None else metrics, step)
        run.state.step = self._last_step = step
        done = step + 1 - self.start_step
        artifacts = run.artifacts
        if done > artifacts.steps_completed:
            artifacts.steps_completed = done
        if batch is not None:
            for adapter in run.batch_takers:
                adapter.offer_batch(step, batch)
        run.converter.publish_step(step, values)

    def eval_ended(self, step: int, eval_name: str, metrics: Mapping[str, Any]) -> None:
        """An evaluation ``eval_name`` after step ``step`` gave ``metrics``: ``EvalEnded``.

        From any thread; never waits. Raises as :meth:`step_ended`."""
        run = self._open_run("eval_ended")
        name = str(eval_name)
        reader = self._eval_readers.get(name)
        if reader is None:
            reader = self._eval_readers[name] = MetricReader(
                f"Session.eval_ended({name!r})", strict=self.strict
            )
        values = reader.read(metrics, step)
        self._note(EvalEnded)
        run.converter.publish_built(
            values, lambda m: run.make(EvalEnded, step=step, eval_name=name, metrics=m)
        )

    def checkpoint_saved(
        self, step: int, name: str, path: str | Path | None = None, **row: Any
    ) -> None:
        """The trainer saved checkpoint ``name`` after step ``step`` (at ``path``):
        ``CheckpointSaved``, its row in ``artifacts.checkpoints`` and, on rank 0, in
        the run's ``checkpoints.jsonl`` (written on the event loop, not here).

        ``row`` adds fields to the row. From any thread; never waits."""
        run = self._open_run("checkpoint_saved")
        entry: dict[str, Any] = {**row, "step": step, "name": str(name), "ts": time.time()}
        entry["path"] = None if path is None else str(path)
        entry["steps_completed"] = run.artifacts.steps_completed
        self._on_loop(lambda: run.record_checkpoint(entry))
        self._note(CheckpointSaved)
        run.converter.publish_built(
            FrozenDict(),
            lambda _: run.make(
                CheckpointSaved, step=step, name=entry["name"], path=entry["path"], row=entry
            ),
        )

    # -- the stop check --------------------------------------------------------------

    @property
    def should_stop(self) -> bool:
        """Whether the trainer should stop now: a callback asked to stop, or, with
        ranks, the ranks agreed to stop after this step.

        Cheap when nothing steers: a few flags read. When a ``controls_loop``
        callback handles what was published since the last check, it first waits
        until that callback has handled it (at most ``control_timeout``): the
        cost of a stop decided per step, one round trip to the event loop plus the
        callback's own time. With ranks, the check after another rank's stop
        request waits for every rank to reach its own check. From any thread but
        the session's event loop (an ``async with`` session: ``await
        check_stop()``). Raises ``RuntimeError`` outside the block.
        """
        run = self._open_run("should_stop")
        if self._verdict is not None:
            return True
        if not self._needed(run):
            return False
        if threading.get_ident() == self._loop_ident:
            raise RuntimeError(
                "Session.should_stop may wait for the event loop, and this is its thread: "
                "in an `async with Session()` block use `await session.check_stop()`"
            )
        with self._check_lock:
            if self._verdict is None:
                self._verdict = anyio.from_thread.run(self._boundary, token=self._token)
        return self._verdict is not None

    async def check_stop(self) -> bool:
        """:attr:`should_stop` on the session's event loop (``async with``): waits
        for the steering callbacks without blocking the loop."""
        run = self._open_run("check_stop")
        if self._verdict is None and self._needed(run):
            self._verdict = await self._boundary()
        return self._verdict is not None

    def _needed(self, run: SessionRun) -> bool:
        assert run.plan is not None  # started
        return bool(self._steered) or run.plan.needed(self._last_step)

    async def _boundary(self) -> Status | None:
        run = self._run
        assert run is not None
        steered, self._steered = tuple(self._steered), set()
        return await run.boundary(self._last_step, steered)

    def _note(self, event_type: type[Event]) -> None:
        run = self._run
        if run is not None and run.steers(event_type):
            self._steered.add(event_type)

    # -- helpers -----------------------------------------------------------------------

    def _open_run(self, method: str) -> SessionRun:
        run = self._run
        if run is None or self._state != "open":
            where = "before `with session:`" if self._state == "new" else "after the session ended"
            raise RuntimeError(
                f"Session.{method}() was called {where}; call it inside "
                "`with Session(...) as session:` (or `async with`)"
            )
        return run

    def _on_loop(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the session's event loop: now on its thread, else soon, in order."""
        if threading.get_ident() == self._loop_ident:
            fn()
        else:
            assert self._jobs is not None  # open
            self._jobs.soon(fn)

    # -- the block: with / async with -----------------------------------------------------

    def __enter__(self) -> Self:
        """Claim the run directory, start the event loop in a thread of its own, subscribe
        the callbacks, join the ranks, publish ``TrainStarted``. Blocks until then; raises
        what that raises (the thread has ended by then)."""
        self._begin()
        self._thread = SessionThread(f"evsys-session:{self.run_key}", self.backend)
        self._thread.start(self._serve)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """End the run (the loop's shutdown) and wait for it, at most ``drain_timeout``
        and a little. Re-raises a steering callback's error (``callback_errors="raise"``,
        ``strict``) or a hook's ``KeyboardInterrupt`` when the block itself raised none."""
        thread, ended = self._thread, self._ended
        assert thread is not None
        assert ended is not None
        assert self._jobs is not None
        self._final = self._status(exc, isinstance(exc, KeyboardInterrupt | SystemExit))
        self._jobs.soon(ended.set)
        if not thread.join(self.drain_timeout + _JOIN_MARGIN):
            _log.warning(
                "the session's event loop did not end in time; its thread is left behind",
                run_key=self.run_key,
                drain_timeout=self.drain_timeout,
            )
        self._raise_after(exc)

    async def _serve(self, ready: Callable[[], None]) -> None:
        """The ``with`` session's event loop: open, wait for the end, end."""
        async with self._bus() as bus:
            await self._open(bus)
            self._ended = ended = anyio.Event()
            ready()
            await ended.wait()
            await self._close(self._final)

    async def __aenter__(self) -> Self:
        """:meth:`__enter__` on the caller's event loop: the bus's tasks run there."""
        self._begin()
        stack = AsyncExitStack()
        bus = await stack.enter_async_context(self._bus())
        try:
            await self._open(bus)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """:meth:`__exit__` on the caller's event loop (shielded from its cancellation)."""
        stack = self._stack
        assert stack is not None
        stopped_by = (anyio.get_cancelled_exc_class(), KeyboardInterrupt, SystemExit)
        cancelled = isinstance(exc, stopped_by)
        try:
            await self._close(self._status(exc, cancelled))
        finally:
            await stack.aclose()
        self._raise_after(exc)

    # -- the run's life --------------------------------------------------------------------

    def _bus(self) -> EventBus:
        return EventBus(close_timeout=self.drain_timeout, batch_delay=self.batch_delay)

    def _begin(self) -> None:
        """In the caller's thread: claim the run dir; the adapters (hooks checked), the
        artifacts and the run's settings."""
        if self._state != "new":
            raise RuntimeError("a Session runs once; make a new Session for another run")
        rank, start = self.rank, self.start_step
        key, run_dir = claim_run_dir(
            self.output_dir,
            self.run_key,
            overwrite=self.overwrite,
            resume=start > 0,
            fixed=self.world_size > 1,
            owner=rank == 0,
        )
        self.run_key = self.state.ctx.run_key = key
        if rank == 0 and start > 0:  # the resumed steps' checkpoints are recorded again
            trim_jsonl(run_dir / "checkpoints.jsonl", start)
        self._adapters = [CallbackAdapter(cb, self.state) for cb in self.callbacks]
        check_state_keys(self.callbacks)
        self.artifacts = LoopArtifacts(
            run_dir=run_dir,
            manifest_path=run_dir / "manifest.json",
            total_requested_steps=self.num_steps,
            start_step=start,
        )
        self._state = "starting"

    async def _open(self, bus: EventBus) -> None:
        """On the event loop: the run, started (see ``SessionRun.start``)."""
        assert self.artifacts is not None
        self._loop_ident = threading.get_ident()
        self._token = anyio.lowlevel.current_token()
        self._jobs = LoopJobs()
        config = hparams(self.config)
        if self.state.rank == 0:  # on disk before the first event, as for a loop run
            write_hparams(self.state.run_dir, config)
        run = SessionRun(self._settings(config), self.state, self.artifacts, self._adapters, bus)
        await run.start()
        self._run = run
        self._started = time.perf_counter()
        self._state = "open"

    async def _close(self, status: Status) -> None:
        run = self._run
        assert run is not None
        assert self.artifacts is not None
        self._state = "ended"
        self.artifacts.train_seconds = time.perf_counter() - self._started
        await run.end(status)

    def _settings(self, config: dict[str, Any]) -> RunSettings:
        """The loop's settings record for this session's run: no step function, no
        evaluators, no checkpoint function of ours; ``config``, its hyperparameters."""
        return RunSettings(
            step=no_step,
            run_key=self.run_key,
            start_step=self.start_step,
            evaluators=(),
            save_every=0,
            checkpoint=None,
            eval_mode="inline",
            eval_timeout=self.control_timeout,
            max_evals_in_flight=1,
            snapshot=None,
            control_timeout=self.control_timeout,
            drain_timeout=self.drain_timeout,
            callback_errors=self.callback_errors,
            checkpoint_on_error=False,
            coordinator=self.coordinator,
            strict=self.strict,
            hparams=config,
        )

    def _status(self, exc: BaseException | None, cancelled: bool) -> Status:
        """How the run ended: the block's exception, else a hook's interrupt, else a
        steering callback's error, else the stop check's verdict, else completed."""
        run, artifacts = self._run, self.artifacts
        assert run is not None
        assert artifacts is not None
        if exc is not None:
            if cancelled:
                return "cancelled"
            artifacts.error = describe(exc)
            artifacts.traceback = user_traceback(exc)
            return "failed"
        if run.interrupted is not None:
            return "cancelled"
        if run.barrier.callback_error is not None:
            artifacts.error = describe(run.barrier.callback_error)
            return "failed"
        return self._verdict or "completed"

    def _raise_after(self, exc: BaseException | None) -> None:
        """After the end: what the run raises when the block itself raised nothing."""
        run = self._run
        if exc is not None or run is None:
            return
        if run.interrupted is not None:
            raise run.interrupted
        if run.barrier.callback_error is not None:
            raise run.barrier.callback_error
