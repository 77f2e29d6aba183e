"""The shutdown: the one way every run ends — completed, stopped, failed or cancelled.

It runs shielded (also from a native asyncio cancel), under one deadline of
``drain_timeout`` that starts at the end, the stop or the cancel, in order:

1. the step in progress (a ``def`` step is awaited in its thread; an ``async``
   step got the cancellation and its cleanup was awaited);
2. in-flight background evals (cancelled at the deadline), then each
   evaluator's ``aclose()``;
3. the last checkpoint: ``final`` on a completed or stopped run,
   ``interrupted`` on a failed or cancelled one (``checkpoint_on_error=False``
   skips it);
4. with ranks, the coordinator's ``finish`` (the others learn how this rank
   ended); then ``TrainEnded``, carrying the artifacts as they stand (no report
   yet);
5. a drain until quiet, events published meanwhile included (a sibling's
   last ``CallbackFailed``) — keeping the deadline's tail for step 6, so a
   stuck callback cannot keep its healthy siblings' files open;
6. each callback's ``teardown`` (``Subscription.aclose``), all at once;
7. the callback report and ``manifest.json`` (and ``error.txt`` for a failed
   step's traceback); then the bus, if the run owns it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from .._util.files import write_atomic
from .._util.log import get_logger
from ..bus import Subscription
from ..evaluators.base import close_evaluators
from ..events import TrainEnded
from ..state import CallbackHealth, LoopArtifacts, Status

if TYPE_CHECKING:
    from ._run import Run

__all__ = ["shutdown"]

_log = get_logger()


async def shutdown(run: Run, status: Status) -> None:
    """The shutdown of ``run`` ending as ``status`` (see the module docstring)."""
    loop, state, artifacts = run.loop, run.state, run.artifacts
    deadline = run.start_shutdown_clock()
    if run.step_worker is not None:
        with anyio.move_on_after(deadline.left()):
            await run.step_worker.wait_idle()  # a def step cannot be cancelled: await it
    run.evals.cancel()
    await close_evaluators(loop.evaluators, timeout=deadline.left())
    if loop.checkpoint is not None and (
        status in ("completed", "stopped") or loop.checkpoint_on_error
    ):
        name = "final" if status in ("completed", "stopped") else "interrupted"
        with anyio.move_on_after(deadline.left()):
            try:
                await run.checkpoints.save(max(state.step, 0), name)
            except Exception as exc:
                _log.warning("final checkpoint failed", name=name, error=repr(exc))
    if loop.coordinator is not None:  # the other ranks learn how this one ended
        with anyio.move_on_after(deadline.left()):
            await run.step_worker_for_calls().call(
                loop.coordinator.finish, status, artifacts.steps_completed, artifacts.error
            )
    run.close_step_worker()
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
    reserve = min(1.0, 0.2 * loop.drain_timeout)  # the tail kept for the teardowns
    # on a caller's bus, wait for this run's callbacks only, not other runs'
    mine = None if run.owns_bus else run.subs
    await run.bus.drain(max(0.0, deadline.left() - reserve), subscriptions=mine)
    closed = [True] * len(run.subs)

    async def close(i: int, sub: Subscription) -> None:
        closed[i] = await sub.aclose(deadline.left())

    async with anyio.create_task_group() as tg:
        for i, sub in enumerate(run.subs):
            tg.start_soon(close, i, sub)
    artifacts.callback_report = _report(run, closed)
    if run.owns_bus:
        run.bus.close_timeout = deadline.left()  # one deadline covers the bus's close too
    artifacts.drain_seconds = deadline.elapsed()
    state.bind(None)
    if state.rank == 0 and artifacts.manifest_path is not None:
        write_atomic(
            artifacts.manifest_path,
            json.dumps(_manifest(artifacts, run.run_key), indent=2, default=str),
        )
        if artifacts.traceback:  # the failed step's traceback stays with the run
            write_atomic(state.run_dir / "error.txt", artifacts.traceback)


def _report(run: Run, closed: list[bool]) -> dict[str, CallbackHealth]:
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
