"""Checkpoints with resume: what is saved at a step boundary, and taken back on a resume.

A checkpoint is saved when ``save_every`` falls due (after step i when
``(i + 1) % save_every == 0``), when a hook asked (``state.request_checkpoint``)
and at the end (``final``, or ``interrupted`` after a failure or a cancel;
docs/design.md, "The shutdown"). Before each, every callback with
``state_dict()`` is waited for (up to ``control_timeout``) until it has
handled every event so far, then asked for its state in its own thread, task
or process; the states go to ``callbacks_state.json`` beside
``checkpoints.jsonl``.

A resume (``run(start_step=k)``) hands each callback its state back before
step k, before it is subscribed (so a process callback is shipped with it).
States are keyed by each callback's ``state_key``: a string attribute or
property of the callback, by default its class name
(``EarlyStoppingCallback`` builds one from its identifying parameters: metric,
eval name and mode). The key, not the callback's place in the list, finds a
state again, so reordered callbacks get their own states back. Two stateful
callbacks with one key are refused before the first step; a saved state that
no callback claims is a WARNING (a renamed metric, a removed callback).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio

from .._util.aio import is_async_callable
from .._util.files import write_atomic
from .._util.log import get_logger
from ..bus import EventBus, Subscription
from ..callbacks._adapter import CallbackAdapter
from ..events import CheckpointSaved, Event
from ..state import LoopArtifacts, LoopState
from ._barrier import ControlBarrier
from ._settings import RunSettings
from ._step_thread import StepThread

__all__ = ["Checkpoints", "CheckpointsRun", "check_state_keys"]

_log = get_logger()


class CheckpointsRun(Protocol):
    """What checkpoints use of their run."""

    @property
    def state(self) -> LoopState: ...

    @property
    def artifacts(self) -> LoopArtifacts: ...

    @property
    def bus(self) -> EventBus: ...

    @property
    def adapters(self) -> Sequence[CallbackAdapter]: ...

    @property
    def subs(self) -> Sequence[Subscription]: ...

    @property
    def barrier(self) -> ControlBarrier: ...

    @property
    def step_thread(self) -> StepThread: ...

    def emit(self, cls: type[Event], **fields: Any) -> int | None: ...


class Checkpoints:
    """One run's checkpoints (see the module docstring). Loop thread only."""

    def __init__(self, run: CheckpointsRun, settings: RunSettings) -> None:
        self.run = run
        self.fn = settings.checkpoint
        self.save_every = settings.save_every
        self.control_timeout = settings.control_timeout
        self.start_step = settings.start_step

    async def after_step(self, step_idx: int, requested: list[str]) -> None:
        """Save what is due after ``step_idx`` and what hooks requested, in that order."""
        if self.fn is None:
            return
        names = list(requested)
        if self.save_every and (step_idx + 1) % self.save_every == 0:
            names.insert(0, f"step_{step_idx + 1}")
        for name in names:
            await self.save(step_idx, name)

    async def save(self, step_idx: int, name: str) -> None:
        """Save checkpoint ``name`` after ``step_idx``: callback states, the user's
        function (``def`` ones in the step thread), ``checkpoints.jsonl``, then
        ``CheckpointSaved`` (through the control barrier).

        Re-raises what the user's function raised (nothing is recorded then).
        """
        run, fn = self.run, self.fn
        assert fn is not None
        await self._save_callback_states()
        if is_async_callable(fn):
            result = await fn(run.state, name)
        else:
            result = await run.step_thread.for_calls().call(fn, run.state, name)
        row: dict[str, Any] = {"step": step_idx, "name": name, "ts": time.time()}
        path: str | None = None
        if isinstance(result, str | os.PathLike):
            path = str(result)
        elif isinstance(result, Mapping):
            row.update(result)
            path = str(result["path"]) if result.get("path") is not None else None
        row["path"] = path
        row["steps_completed"] = run.artifacts.steps_completed
        # the step a resume from this checkpoint starts at: the steps it holds, counted
        # over the whole run (an ``interrupted`` one is saved during the failed step)
        row["resume_step"] = self.start_step + run.artifacts.steps_completed
        run.artifacts.checkpoints.append(row)
        if run.state.rank == 0:
            _append_line(run.state.run_dir / "checkpoints.jsonl", json.dumps(row, default=str))
        seq = run.emit(CheckpointSaved, step=step_idx, name=name, path=path, row=row)
        await run.barrier.wait(seq, CheckpointSaved)

    async def _save_callback_states(self) -> None:
        run = self.run
        stateful = [
            (a, s) for a, s in zip(run.adapters, run.subs, strict=True) if _stateful(a.callback)
        ]
        if not stateful or run.state.rank != 0:
            return
        last = run.bus.last_seq
        timeout = self.control_timeout
        states: dict[str, Any] = {}
        for adapter, sub in stateful:
            with anyio.move_on_after(timeout) as scope:
                await sub.wait(last)
                try:  # in the callback's own thread, between its batches
                    key = state_key(adapter.callback)  # stable across reorders
                    states[key] = await sub.call(adapter.state_call("state_dict"))
                except Exception as exc:
                    _log.warning("state_dict failed", callback=adapter.name, error=repr(exc))
            if scope.cancelled_caught:
                _log.warning(
                    "state_dict skipped: the callback did not catch up in time",
                    callback=adapter.name,
                    control_timeout=timeout,
                )
        write_atomic(
            run.state.run_dir / "callbacks_state.json",
            json.dumps(states, indent=2, default=str),
        )

    def load_callback_states(self) -> None:
        """On a resume: hand each callback its saved state, before the first step (and
        before it is subscribed). A state no callback claims is a WARNING."""
        if self.start_step > 0:
            path = self.run.state.run_dir / "callbacks_state.json"
            _load_states(path, [a.callback for a in self.run.adapters])


# -- resume: states by a stable key --------------------------------------------------


def _stateful(callback: object) -> bool:
    return callable(getattr(callback, "state_dict", None))


def state_key(callback: object) -> str:
    """The key of ``callback``'s saved state: its ``state_key``, else its class name."""
    key = getattr(callback, "state_key", None)
    return key if isinstance(key, str) and key else type(callback).__name__


def check_state_keys(callbacks: Sequence[object]) -> None:
    """Refuse two callbacks with ``state_dict()`` that would save under one key.

    Raises ``ValueError`` naming the key and the fix.
    """
    seen: dict[str, object] = {}
    for cb in callbacks:
        if not _stateful(cb):
            continue
        key = state_key(cb)
        if key in seen:
            raise ValueError(
                f"two callbacks save their state under one key {key!r} ({seen[key]!r} and "
                f"{cb!r}), so a resume could not tell them apart; give each a distinct "
                "`state_key` (a class attribute or a constructor argument)"
            )
        seen[key] = cb


def _load_states(path: Path, callbacks: Sequence[object]) -> None:
    """Hand each callback with ``load_state_dict`` its state saved under its key.

    A saved state that no callback claims is logged at WARNING; the run goes on.
    """
    if not path.exists():
        return
    states: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    claimed: set[str] = set()
    for cb in callbacks:
        key = state_key(cb)
        loader = getattr(cb, "load_state_dict", None)
        if key in states and callable(loader):
            loader(states[key])
            claimed.add(key)
    unclaimed = sorted(set(states) - claimed)
    if unclaimed:
        _log.warning(
            "saved callback states that no callback of this run claims were not loaded "
            "(a callback removed, or its state_key changed)",
            keys=", ".join(unclaimed),
            path=str(path),
        )


def _append_line(path: Path, line: str) -> None:
    # one short line per checkpoint: cheaper inline than a thread hop
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
