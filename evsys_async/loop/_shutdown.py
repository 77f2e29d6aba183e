"""The shutdown: the one way every run ends — completed, stopped, failed or cancelled.

It runs shielded (also from a native asyncio cancel), under one deadline of
``drain_timeout`` that starts at the end, the stop or the cancel. Its phases
are the numbered steps of docs/design.md, "The shutdown", one function each,
called in order by :func:`shutdown`:

1. :func:`_finish_step`: the step in progress (a ``def`` step is awaited in
   its thread; an ``async`` step got the cancellation and its cleanup was
   awaited);
2. :func:`_close_evals`: in-flight background evals (cancelled at the
   deadline), then each evaluator's ``aclose()``;
3. :func:`_last_checkpoint`: ``final`` on a completed or stopped run,
   ``interrupted`` on a failed or cancelled one (``checkpoint_on_error=False``
   skips it);
4. :func:`_finish_ranks`: with ranks, the coordinator's ``finish`` (the
   others learn how this rank ended), the last call into the step thread;
   then :func:`_announce_end`: ``TrainEnded``, carrying the artifacts as they
   stand (no report yet);
5. :func:`_drain`: a drain until quiet, events published meanwhile included
   (a sibling's last ``CallbackFailed``) — keeping the deadline's tail for
   step 6, so a stuck callback cannot keep its healthy siblings' files open;
6. :func:`_teardown`: each callback's ``teardown`` (``Subscription.aclose``),
   all at once;
7. :func:`_report_and_manifest`: the callback report and ``manifest.json``
   (and ``error.txt`` for a failed step's traceback); then the bus's own
   close, if the run owns it.

No phase raises for a callback, an evaluator or a checkpoint function: each
failure is logged, and the next phase runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

import anyio
import msgspec

from .._util.aio import Deadline
from .._util.files import write_atomic
from .._util.log import get_logger
from ..bus import EventBus, Subscription
from ..callbacks._adapter import CallbackAdapter
from ..evaluators.base import close_evaluators
from ..events import Event, TrainEnded
from ..state import CallbackHealth, LoopArtifacts, LoopState, Status
from ._checkpoints import Checkpoints
from ._evals import Evals
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

    def emit(self, cls: type[Event], **fields: Any) -> int | None: ...


async def shutdown(
    run: ShutdownRun, settings: RunSettings, status: Status, deadline: Deadline
) -> None:
    """The shutdown of ``run`` ending as ``status``, within ``deadline`` (see the module
    docstring). Never raises for a callback, an evaluator or a checkpoint function."""
    await _finish_step(run, deadline)
    await _close_evals(run, settings, deadline)
    await _last_checkpoint(run, settings, status, deadline)
    await _finish_ranks(run, settings, status, deadline)
    _announce_end(run, status)
    await _drain(run, settings, deadline)
    closed = await _teardown(run, deadline)
    _report_and_manifest(run, settings, closed, deadline)


async def _finish_step(run: ShutdownRun, deadline: Deadline) -> None:
    """1. A ``def`` step cannot be cancelled: await it, until the deadline."""
    with anyio.move_on_after(deadline.left()):
        await run.step_thread.wait_idle()


async def _close_evals(run: ShutdownRun, settings: RunSettings, deadline: Deadline) -> None:
    """2. Cancel the background evals still running; each evaluator's ``aclose()``."""
    run.evals.cancel()
    await close_evaluators(settings.evaluators, timeout=deadline.left())


async def _last_checkpoint(
    run: ShutdownRun, settings: RunSettings, status: Status, deadline: Deadline
) -> None:
    """3. ``final`` after a completed or stopped run, else ``interrupted`` (unless
    ``checkpoint_on_error=False``); a failure is a WARNING."""
    ended_well = status in ("completed", "stopped")
    if settings.checkpoint is None or not (ended_well or settings.checkpoint_on_error):
        return
    name = "final" if ended_well else "interrupted"
    with anyio.move_on_after(deadline.left()):
        try:
            await run.checkpoints.save(max(run.state.step, 0), name)
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
    """6. End every subscription at once (each callback's ``teardown``); per
    subscription, whether it ended within the deadline."""
    closed = [True] * len(run.subs)

    async def close(i: int, sub: Subscription) -> None:
        closed[i] = await sub.aclose(deadline.left())

    async with anyio.create_task_group() as tg:
        for i, sub in enumerate(run.subs):
            tg.start_soon(close, i, sub)
    return closed


def _report_and_manifest(
    run: ShutdownRun, settings: RunSettings, closed: list[bool], deadline: Deadline
) -> None:
    """7. The callback report, ``manifest.json`` and ``error.txt`` (rank 0); the
    rest of the deadline bounds the bus's close, if the run owns the bus."""
    state, artifacts = run.state, run.artifacts
    artifacts.callback_report = _callback_report(run, closed)
    if run.owns_bus:
        run.bus.close_timeout = deadline.left()  # one deadline covers the bus's close too
    artifacts.drain_seconds = deadline.elapsed()
    state.bind(None)
    if state.rank == 0 and artifacts.manifest_path is not None:
        write_atomic(
            artifacts.manifest_path,
            json.dumps(_manifest(artifacts, settings.run_key), indent=2, default=str),
        )
        if artifacts.traceback:  # the failed step's traceback stays with the run
            write_atomic(state.run_dir / "error.txt", artifacts.traceback)


def _callback_report(run: ShutdownRun, closed: list[bool]) -> dict[str, CallbackHealth]:
    """Per callback, under its name: every event counted once, and how it stands."""
    health: dict[str, CallbackHealth] = {}
    dead: set[str] = set()  # their process died: reported when it did, not left behind
    for adapter, sub, ok in zip(run.adapters, run.subs, closed, strict=True):
        st = sub.stats()
        if st.disabled is not None:
            dead.add(adapter.name)
        health[adapter.name] = CallbackHealth(
            delivered=st.delivered,
            failed=st.failed,
            dropped=st.dropped,
            pending=st.pending if not ok else 0,
            stuck=sub.stuck or not ok,
            control_timeouts=adapter.control_timeouts,
            coalesced=st.coalesced,
            # a callback that switched itself off says why (docs/callbacks.md), and so
            # does one whose process died (docs/isolation.md)
            disabled=getattr(adapter.callback, "disabled_reason", None) or st.disabled,
            startup_seconds=st.startup_seconds,
        )
    short = {n: h.pending for n, h in health.items() if h.pending or (h.stuck and n not in dead)}
    if short:
        _log.warning("drain deadline passed; callbacks left behind", callbacks=short)
    return health


def _manifest(artifacts: LoopArtifacts, run_key: str) -> dict[str, Any]:
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
