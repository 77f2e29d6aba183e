"""The shutdown: the one way every run ends — completed, stopped, failed or cancelled.

It runs shielded (also from a native asyncio cancel), under one deadline of
``drain_timeout`` that starts at the end, the stop or the cancel. Its phases
are the numbered steps of docs/design.md, "The shutdown", one function each,
called in order by :func:`shutdown`:

1. :func:`_finish_step`: the step in progress (a ``def`` step is awaited in
   its thread, and abandoned there if it has not returned by the deadline, or
   ``grace`` seconds after ``loop.cancel``; an ``async`` step got the
   cancellation and its cleanup was awaited);
2. :func:`_close_evals`: in-flight background evals (cancelled at the
   deadline), then each evaluator's ``aclose()``; then, under ``strict``, a
   run that trained to its end with an unhealthy callback is ``failed``
   (:func:`_strict_verdict`);
3. :func:`_last_checkpoint`: ``final`` on a completed or stopped run (not
   again when the cadence saved after that very step), ``interrupted`` on a
   failed or cancelled one (``checkpoint_on_error=False`` skips it; so does
   an abandoned step, which may still be changing the model);
4. :func:`_finish_ranks`: with ranks, the coordinator's ``finish`` (the
   others learn how this rank ended), the last call into the step thread;
   then :func:`_announce_end`: ``TrainEnded``, carrying the artifacts as they
   stand (no report yet);
5. :func:`_drain`: a drain until quiet, events published meanwhile included
   (a sibling's last ``CallbackFailed``) — keeping the deadline's tail for
   step 6, so a stuck callback cannot keep its healthy siblings' files open;
6. :func:`_teardown`: each callback's ``teardown`` (``Subscription.aclose``),
   and each of the loop's subscribers' subscriptions, all at once;
7. :func:`_report_and_manifest`: the callback report, the strict verdict again
   (a writer may degrade on the run's last rows), ``manifest.json`` and
   ``error.txt`` for a failed step's traceback (``_runfiles.py``); then the
   bus's own close, if the run owns it.

No phase raises for a callback, an evaluator or a checkpoint function: each
failure is logged, and the next phase runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import anyio

from .._util.aio import Deadline
from .._util.log import get_logger
from ..bus import EventBus, SubscriberStats, Subscription
from ..callbacks._adapter import CallbackAdapter
from ..evaluators.base import close_evaluators
from ..events import Event, TrainEnded
from ..state import CallbackHealth, Degraded, LoopArtifacts, LoopState, Status
from ._checkpoints import Checkpoints
from ._control import Cancel
from ._evals import Evals
from ._runfiles import write_record
from ._settings import RunSettings
from ._step_thread import StepThread

__all__ = ["ShutdownRun", "shutdown"]

_log = get_logger()


class ShutdownRun(Protocol):
    """What the shutdown uses of its run; it writes the ``artifacts``."""

    @property
    def state(self) -> LoopState: ...

    @property
    def artifacts(self) -> LoopArtifacts: ...

    @property
    def bus(self) -> EventBus: ...

    #: the run made ``bus`` (and closes it): drain it all, and bound its close
    @property
    def owns_bus(self) -> bool: ...

    @property
    def adapters(self) -> Sequence[CallbackAdapter]: ...

    @property
    def subs(self) -> Sequence[Subscription]: ...

    @property
    def evals(self) -> Evals: ...

    @property
    def checkpoints(self) -> Checkpoints: ...

    @property
    def step_thread(self) -> StepThread: ...

    @property
    def stop_rank(self) -> int | None: ...

    #: set once the run is cancelled (``loop.cancel``): a ``def`` step's grace starts
    @property
    def cancelling(self) -> anyio.Event: ...

    #: ``loop.cancel``'s request, if one came: its ``grace``
    @property
    def cancel_request(self) -> Cancel | None: ...

    def emit(self, cls: type[Event], **fields: Any) -> int | None: ...

    def end_loop_subscriptions(self) -> list[Subscription]: ...


async def shutdown(
    run: ShutdownRun, settings: RunSettings, status: Status, deadline: Deadline
) -> None:
    """The shutdown of ``run`` ending as ``status``, within ``deadline`` (see the module
    docstring). Never raises for a callback, an evaluator or a checkpoint function."""
    await _finish_step(run, deadline)
    await _close_evals(run, settings, deadline)
    status = _strict_verdict(run, settings, status, _health(run, None))
    await _last_checkpoint(run, settings, status, deadline)
    await _finish_ranks(run, settings, status, deadline)
    _announce_end(run, status)
    await _drain(run, settings, deadline)
    closed = await _teardown(run, deadline)
    _report_and_manifest(run, settings, closed, deadline)


async def _finish_step(run: ShutdownRun, deadline: Deadline) -> None:
    """1. A ``def`` step cannot be cancelled: await it until the deadline, or until
    ``grace`` seconds after ``loop.cancel``; then abandon it in its thread."""
    thread = run.step_thread
    if not thread.busy:  # no call in progress: only the conversions still queued
        with anyio.move_on_after(deadline.left()):
            await thread.wait_idle()
        return

    async def give_up_after_grace(scope: anyio.CancelScope) -> None:
        await run.cancelling.wait()
        request = run.cancel_request
        await anyio.sleep(request.grace if request is not None else 0.0)
        scope.cancel()

    with anyio.move_on_after(deadline.left()):
        async with anyio.create_task_group() as tg:
            tg.start_soon(give_up_after_grace, tg.cancel_scope)
            await thread.wait_idle()
            tg.cancel_scope.cancel()
    if thread.busy:
        thread.abandon()
        _log.warning(
            "the step in progress did not return; its thread is abandoned (a daemon: it "
            "never holds the process open) and its result will be dropped",
            step=run.state.step,
        )


async def _close_evals(run: ShutdownRun, settings: RunSettings, deadline: Deadline) -> None:
    """2. Cancel the background evals still running; each evaluator's ``aclose()``."""
    run.evals.cancel()
    await close_evaluators(settings.evaluators, timeout=deadline.left())


async def _last_checkpoint(
    run: ShutdownRun, settings: RunSettings, status: Status, deadline: Deadline
) -> None:
    """3. ``final`` after a completed or stopped run, else ``interrupted`` (unless
    ``checkpoint_on_error=False``); a failure is a WARNING. ``final`` is not saved
    again for the step the cadence (or a request) just saved, and nothing is saved
    while an abandoned step may still be changing the model."""
    ended_well = status in ("completed", "stopped")
    if settings.checkpoint is None or not (ended_well or settings.checkpoint_on_error):
        return
    if run.step_thread.abandoned:
        _log.warning("no last checkpoint: the abandoned step may still be changing the model")
        return
    name = "final" if ended_well else "interrupted"
    step = max(run.state.step, 0)
    rows = run.artifacts.checkpoints
    if ended_well and rows and rows[-1]["step"] == step:
        return  # one save per step: the last row is this run's last checkpoint
    with anyio.move_on_after(deadline.left()):
        try:
            await run.checkpoints.save(step, name)
        except Exception as exc:
            _log.warning("final checkpoint failed", name=name, error=repr(exc))


async def _finish_ranks(
    run: ShutdownRun, settings: RunSettings, status: Status, deadline: Deadline
) -> None:
    """4. With ranks, the other ranks learn how this one ended; then the run is done
    with its step thread."""
    coordinator = settings.coordinator
    if coordinator is not None:
        artifacts = run.artifacts
        with anyio.move_on_after(deadline.left()):
            await run.step_thread.for_calls().call(
                coordinator.finish, status, artifacts.steps_completed, artifacts.error
            )
    run.step_thread.close()


def _announce_end(run: ShutdownRun, status: Status) -> None:
    """4. ``TrainEnded``, with the artifacts as they stand (the report comes at 7)."""
    state, artifacts = run.state, run.artifacts
    artifacts.status = status
    artifacts.stop_reason = state.stop_reason
    state.artifacts = replace(artifacts, checkpoints=list(artifacts.checkpoints))
    run.emit(
        TrainEnded,
        status=status,
        steps_completed=artifacts.steps_completed,
        num_steps=state.num_steps,
        stop_reason=state.stop_reason,
        train_seconds=artifacts.train_seconds,
        error=artifacts.error,
        stop_rank=run.stop_rank,
    )


async def _drain(run: ShutdownRun, settings: RunSettings, deadline: Deadline) -> None:
    """5. Until quiet, keeping the deadline's tail (20 %, at most 1 s) for 6."""
    reserve = min(1.0, 0.2 * settings.drain_timeout)
    # on a caller's bus, wait for this run's callbacks only, not other runs'
    mine = None if run.owns_bus else run.subs
    await run.bus.drain(max(0.0, deadline.left() - reserve), subscriptions=mine)


async def _teardown(run: ShutdownRun, deadline: Deadline) -> list[bool]:
    """6. End every subscription at once (each callback's ``teardown``, and the loop's
    subscribers'); per callback, whether it ended within the deadline."""
    subs = [*run.subs, *run.end_loop_subscriptions()]
    closed = [True] * len(subs)

    async def close(i: int, sub: Subscription) -> None:
        closed[i] = await sub.aclose(deadline.left())

    async with anyio.create_task_group() as tg:
        for i, sub in enumerate(subs):
            tg.start_soon(close, i, sub)
    return closed[: len(run.subs)]


def _report_and_manifest(
    run: ShutdownRun, settings: RunSettings, closed: list[bool], deadline: Deadline
) -> None:
    """7. The callback report, the strict verdict on it, ``manifest.json`` and
    ``error.txt`` (each rank in its run dir); the rest of the deadline bounds the
    bus's close, if the run owns the bus."""
    state, artifacts = run.state, run.artifacts
    artifacts.callback_report = _callback_report(run, closed)
    # a writer may have lost rows after TrainEnded: the run's record says so
    artifacts.status = _strict_verdict(run, settings, artifacts.status, artifacts.callback_report)
    if run.owns_bus:
        run.bus.close_timeout = deadline.left()  # one deadline covers the bus's close too
    artifacts.drain_seconds = deadline.elapsed()
    state.bind(None)
    write_record(artifacts, state, settings.run_key)


def _strict_verdict(
    run: ShutdownRun, settings: RunSettings, status: Status, report: Mapping[str, CallbackHealth]
) -> Status:
    """Under ``strict``, a run that trained to its end (``completed``, ``stopped``) with
    a callback that failed, lost data or was switched off is ``failed``, its error
    naming the callback (docs/guide.md, "Endings")."""
    if not settings.strict or status not in ("completed", "stopped"):
        return status
    for name, health in report.items():
        problem = _problem(health)
        if problem is not None:
            run.artifacts.error = f"strict: callback {name!r} {problem}"
            return "failed"
    return status


def _problem(health: CallbackHealth) -> str | None:
    """What is wrong with a callback, in words, or ``None`` (a policy's drops are not)."""
    if health.degraded is not None:
        d = health.degraded
        lost = f", {d.rows_lost} rows lost" if d.rows_lost else ""
        since = f" from step {d.missing_from_step}" if d.missing_from_step is not None else ""
        return f"is degraded: {d.reason}{lost}{since}"
    if health.disabled:
        return f"was disabled: {health.disabled}"
    if health.hook_failures:
        hooks = ", ".join(f"{hook} {n}x" for hook, n in sorted(health.hook_failures.items()))
        return f"failed in {hooks}"
    if health.failed:
        return f"failed on {health.failed} event(s)"
    if health.stuck:
        return "is stuck"
    return None


def _health(run: ShutdownRun, closed: list[bool] | None) -> dict[str, CallbackHealth]:
    """Per callback, under its name: every event counted once, and how it stands
    (``closed``: whether each ended within the deadline; ``None`` while running)."""
    health: dict[str, CallbackHealth] = {}
    for i, (adapter, sub) in enumerate(zip(run.adapters, run.subs, strict=True)):
        st = sub.stats()
        ok = True if closed is None else closed[i]
        health[adapter.name] = CallbackHealth(
            delivered=st.delivered,
            failed=st.failed,
            dropped=st.dropped,
            pending=st.pending if not ok else 0,
            stuck=sub.stuck or not ok,
            control_timeouts=adapter.control_timeouts,
            coalesced=st.coalesced,
            # why it handled no more: the bus switched it off (setup failed, failures in
            # a row, its process died: docs/isolation.md), else it switched itself off
            disabled=st.disabled or adapter.disabled_reason,
            startup_seconds=st.startup_seconds,
            hook_failures=_hook_failures(st),
            degraded=_degraded(adapter),
        )
    return health


def _callback_report(run: ShutdownRun, closed: list[bool]) -> dict[str, CallbackHealth]:
    """The report on what ``run()`` returns; callbacks left behind are a WARNING."""
    health = _health(run, closed)
    # their process died: reported when it did, not left behind
    dead = {a.name for a, sub in zip(run.adapters, run.subs, strict=True) if sub.stats().disabled}
    short = {n: h.pending for n, h in health.items() if h.pending or (h.stuck and n not in dead)}
    if short:
        _log.warning("drain deadline passed; callbacks left behind", callbacks=short)
    return health


def _hook_failures(st: SubscriberStats) -> dict[str, int]:
    """Failed ``setup``/``flush``/``teardown`` calls by hook (the names the adapter
    gives the bus's lifecycle slots)."""
    return {str(hook): int(n) for hook, n in st.failed_hooks.items() if n}


def _degraded(adapter: CallbackAdapter) -> Degraded | None:
    """Why a callback's output is incomplete: the adapter's view (a callback in its own
    process reports it there); something other than a ``Degraded`` a user's callback
    set is said in words."""
    found = adapter.degraded
    if found is None:
        other = getattr(adapter.callback, "degraded", None)
        return None if other is None else Degraded(reason=str(other))
    return found
