"""Checkpoints and callback state: what is saved at a step boundary, and loaded on a resume.

A checkpoint is saved when ``save_every`` falls due (after step i when
``(i + 1) % save_every == 0``), when a hook asked (``state.request_checkpoint``)
and at the end (``final``, or ``interrupted`` after a failure or a cancel).
Before each, every callback with ``state_dict()`` is waited for (up to
``control_timeout``) until it has handled every event so far, then asked for
its state in its own thread, task or process; the states go to ``callbacks_state.json``
beside ``checkpoints.jsonl``, keyed by ``state_key`` (``_resume.py``), and a
resume (``run(start_step=k)``) hands them back before step k.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .._util.aio import is_async_callable
from .._util.files import write_atomic
from .._util.log import get_logger
from ..events import CheckpointSaved
from ._resume import load_callback_states, state_key

if TYPE_CHECKING:
    from ._run import Run

__all__ = ["Checkpoints"]

_log = get_logger()


class Checkpoints:
    """One run's checkpoints (see the module docstring)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.fn = run.loop.checkpoint
        self.save_every = run.loop.save_every

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
        ``CheckpointSaved`` (through the control barrier)."""
        run, fn = self.run, self.fn
        assert fn is not None
        await self._save_callback_states()
        if is_async_callable(fn):
            result = await fn(run.state, name)
        else:
            worker = run.step_worker_for_calls()
            result = await worker.call(fn, run.state, name)
        row: dict[str, Any] = {"step": step_idx, "name": name, "ts": time.time()}
        path: str | None = None
        if isinstance(result, str | os.PathLike):
            path = str(result)
        elif isinstance(result, Mapping):
            row.update(result)
            path = str(result["path"]) if result.get("path") is not None else None
        row["path"] = path
        row["steps_completed"] = run.artifacts.steps_completed
        run.artifacts.checkpoints.append(row)
        if run.state.rank == 0:
            _append_line(run.state.run_dir / "checkpoints.jsonl", json.dumps(row, default=str))
        seq = run.emit(CheckpointSaved, step=step_idx, name=name, path=path, row=row)
        await run.barrier.wait(seq, CheckpointSaved)

    async def _save_callback_states(self) -> None:
        run = self.run
        stateful = [
            (a, s)
            for a, s in zip(run.adapters, run.subs, strict=True)
            if callable(getattr(a.callback, "state_dict", None))
        ]
        if not stateful or run.state.rank != 0:
            return
        last = run.bus.last_seq
        timeout = run.loop.control_timeout
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
        """On a resume: hand each callback its saved state, before the first step."""
        run = self.run
        if run.start_step > 0:
            path = run.state.run_dir / "callbacks_state.json"
            load_callback_states(path, [a.callback for a in run.adapters])


def _append_line(path: Path, line: str) -> None:
    # one short line per checkpoint: cheaper inline than a thread hop
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
