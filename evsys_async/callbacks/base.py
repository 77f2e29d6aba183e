"""Callback: the base class of every callback, and what each of its hooks promises.

Which hook runs: for a loop-scope event exactly one hook runs, the named hook
of the nearest class in the event's MRO that the callback overrides,
otherwise ``on_event``. ``on_envelope`` additionally sees every event with its
sequence number. Experiment-scope hooks are called only by
:func:`~evsys_async.callbacks.dispatch` (the experiment calls it).

Where the hooks run is decided once, when the callback is subscribed, and a
callback is subscribed only to the events of the hooks it overrides: in a
task on the event loop when every hook it overrides (``setup``, ``teardown``
and ``flush`` included) is ``async def``; else in a daemon thread of its own,
where its ``def`` hooks run one at a time, in order, and its ``async def``
hooks are run on the event loop from that thread, still one at a time. With
``isolation = "process"`` it runs in a child process of its own, where the
same choice is made again (``docs/isolation.md``). The runtime's side — the
adapter that turns a callback into one bus subscriber — is ``_adapter.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from ..events import Envelope, Event
from ..policies import Lossless, Policy
from ..state import (
    Arm,
    Degraded,
    ExperimentResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    RunResult,
)

__all__ = ["Callback"]


class Callback:
    """Base class of every callback; every hook is a no-op until overridden.

    Override any hook with ``def`` (runs in the callback's own thread, so
    blocking I/O there stalls nothing) or ``async def`` (runs on the event
    loop: await, don't compute — CPU work or ``time.sleep`` in an ``async
    def`` hook stalls the loop). A hook's return value is ignored (an
    ``async def`` hook's coroutine is awaited). What a hook raises is logged
    as the callback's failure (and published as ``CallbackFailed``); the run
    and the other callbacks go on. Class attributes tune delivery:

    * ``policy`` — ``Lossless()`` (default), ``Latest()`` or ``DropOldest(n)``;
    * ``hook_timeout`` — seconds per hook call, ``None`` for no limit;
    * ``controls_loop`` — the loop waits for this callback after each event it
      handles, so a ``request_stop`` on step k's event stops before step k+1;
    * ``wants_batch`` — ``on_step_end`` gets the live batch (else ``None``);
    * ``isolation`` — ``None`` (a task if every hook is ``async def``, else its
      own thread), ``"thread"``, ``"task"``, or ``"process"``: a child process
      of its own, for callbacks that compute (``docs/isolation.md``);
    * ``runs_without_setup`` — ``True`` if the hooks may run although ``setup``
      raised (by default such a callback is disabled for the run, its events
      counted as dropped and the reason in the report);
    * ``max_consecutive_failures`` — switch the callback off after this many
      failures in a row (``None``, the default: never; failing is cheap).

    A writer whose output is incomplete sets ``self.degraded`` to a
    :class:`~evsys_async.state.Degraded` (reason, rows lost, first missing
    step): the report, ``manifest.json`` and the summaries then name it
    instead of "ok".

    Every loop-scope hook gets the run's live :class:`LoopState`, from any
    thread: ``state.request_stop(reason, failed=...)``,
    ``state.request_checkpoint(name)`` and ``state.request_eval()`` take effect
    at the next step boundary, and ``state.publish(event)`` publishes a custom
    event on the run's bus. ``state.step`` is where the loop is now; a hook
    takes its step from ``step_idx`` (the loop may have moved on).

    ``built_from`` is ``(kind, params)`` when :func:`build_callbacks` built the
    callback from a config entry (a process callback is then built again from
    them in its process, instead of being pickled), else ``None``.

    A subclass need not call ``super().__init__()``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    policy: ClassVar[Policy] = Lossless()
    hook_timeout: ClassVar[float | None] = None
    controls_loop: ClassVar[bool] = False
    wants_batch: ClassVar[bool] = False
    isolation: Literal["task", "thread", "process"] | None = None
    built_from: tuple[str, dict[str, Any]] | None = None
    #: ``True``: the callback's hooks still run when its ``setup`` raised (it can work
    #: half-built); by default a callback whose ``setup`` failed is disabled for the run
    runs_without_setup: ClassVar[bool] = False
    #: after this many failures in a row the callback is switched off for the run
    #: (its later events count as dropped, the reason in the report); ``None``: never
    max_consecutive_failures: ClassVar[int | None] = None
    #: set by a writer whose output is incomplete (rows it could not write): the
    #: report, the manifest and the summaries name it instead of "ok"
    degraded: Degraded | None = None

    # Every hook returns ``Any``: a ``def`` override returns ``None``, an ``async def``
    # one a coroutine, and both must type-check as overrides of the same method.

    # -- loop scope ----------------------------------------------------------------

    def on_train_start(self, state: LoopState) -> Any:
        """The run began (``TrainStarted``), before its first step.

        Runs after ``setup``, in the callback's thread or task. ``state.num_steps``,
        ``state.start_step`` (> 0 on a resume) and ``state.run_dir`` are set.
        """

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: Any, metrics: dict[str, float]
    ) -> Any:
        """Step ``step_idx`` (0-based) finished (``StepEnded``).

        ``metrics`` are the step's metrics as floats, read-only (every callback
        sees the same mapping: copy it with ``dict(metrics)`` to change it).
        ``batch`` is the step's live batch for a ``wants_batch`` callback (only
        the newest is held: a hook that runs behind gets ``None`` for older
        steps), else ``None``; never in replay, over a transport or in a process.
        Runs in the callback's thread or task, behind the loop: the loop does
        not wait for it unless ``controls_loop`` is set. May call
        ``state.request_stop()`` and the other requests.
        """

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> Any:
        """Evaluator ``eval_name`` finished the eval due after step ``step_idx``
        (``EvalEnded``); ``metrics`` are its results, read-only.

        Runs in the callback's thread or task. An early stop decides here:
        ``state.request_stop(reason)`` ends the run after the current step.
        """

    def on_checkpoint(self, state: LoopState, row: dict[str, Any]) -> Any:
        """A checkpoint was saved (``CheckpointSaved``); ``row`` is its line of
        ``checkpoints.jsonl``, read-only: ``step``, ``name``, ``ts``, ``path``,
        ``steps_completed`` and what a checkpoint function's mapping added.

        Runs in the callback's thread or task.
        """

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> Any:
        """The run ended (``TrainEnded``): ``artifacts.status`` says how
        (``completed``, ``stopped``, ``failed`` or ``cancelled``), with the steps
        completed, the stop reason and a failed step's error.

        Runs in the callback's thread or task, during the shutdown (under its
        deadline), before ``teardown``. ``artifacts.callback_report`` is still
        empty here: the drain has not happened yet.
        """

    def on_event(self, state: LoopState, event: Event) -> Any:
        """Any loop-scope event for which this callback overrides no named hook:
        ``StopRequested``, ``EvalFailed``, ``CallbackFailed``, ``SubscriberLagged``,
        user events (``state.publish``), and the named hooks' events too when
        those are not overridden. Overriding it subscribes the callback to every
        event. Never gets experiment-scope events (those go to their hooks,
        through ``dispatch``).

        Runs in the callback's thread or task.
        """

    def on_envelope(self, state: LoopState, envelope: Envelope) -> Any:
        """Every event, as an :class:`Envelope` with the bus's sequence number, after
        the event's own hook (if any) ran — for event logs and transports.
        Overriding it subscribes the callback to every event.

        Runs in the callback's thread or task.
        """

    def flush(self) -> Any:
        """After each batch of events this callback handled: write out what the
        hooks buffered (one write per batch, not per event).

        Runs in the callback's thread or task; a barrier (``controls_loop``, a
        drain) waits for it, so files are complete when the barrier returns.
        """

    def setup(self, state: LoopState) -> Any:
        """Before this callback's first event: open files and connections here.

        Runs in the callback's thread or task (in its process with
        ``isolation = "process"``), after it was subscribed; the loop does not
        wait for it to start training. What it raises is a failure of ``setup``;
        events still come.
        """

    def teardown(self, state: LoopState) -> Any:
        """After this callback's last event, on every ending (completed, stopped,
        failed, cancelled): close files and connections here.

        Runs in the callback's thread or task, in the run's shutdown, under its
        deadline (``drain_timeout``), after the drain.
        """

    # -- experiment scope: called by ``dispatch`` --------------------------------------
    #
    # Called one at a time, in the list's order, on the experiment's event loop:
    # an ``async def`` hook is awaited there, a ``def`` hook runs in a daemon
    # thread and is awaited. What a hook raises is logged (WARNING) and the next
    # callback runs; the experiment goes on. With ``max_concurrency > 1`` they go
    # only to the experiment's own ``callbacks``.

    def on_experiment_start(self, ctx: LogContext) -> Any:
        """The experiment began; ``ctx`` is the context every run of it shares
        (``ctx.output_dir`` is the experiment's directory). Write ids and values
        for the callbacks after this one into ``ctx.ids`` and ``ctx.extras``."""

    def on_group_start(self, ctx: LogContext, group_name: str) -> Any:
        """The runs of one arm (named ``group_name``) begin."""

    def on_run_start(self, ctx: LogContext) -> Any:
        """One run begins, before its loop starts: ``ctx.run_key`` and
        ``ctx.run_config`` (the arm's params, its name, the repeat and its random seed)
        are this run's."""

    def on_benchmark_eval(
        self, ctx: LogContext, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> Any:
        """A benchmark was evaluated (called by the user's code through ``dispatch``).

        ``eval_result`` is a mapping or any object with ``name`` and ``metrics``;
        ``predictions`` the rows it produced (any iterable, or ``None``); ``step``
        the step it evaluated, if known.
        """

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: Arm) -> Any:
        """One run of ``arm`` ended (after its shutdown); ``run_result`` has its
        status, steps and the last value of each eval metric."""

    def on_experiment_end(self, ctx: LogContext, result: ExperimentResult) -> Any:
        """Every run ended; ``result`` holds each arm's runs and means and the best
        arm."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"
