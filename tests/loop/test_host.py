"""A run on an event loop of its own (``loop/_host.py``): ``await loop.run(own_thread=True)``.

The run gets an event loop in a thread the loop owns; the caller awaits the result from
its own loop. Counted, never timed: the run's steps complete while the caller's loop is
blocked outright; an ``async def`` subscriber made on the caller's loop runs there, in
order; cancelling the awaiting task cancels the run, and its files are complete when the
cancellation arrives.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import evsys_async as ev
from evsys_async.events import Event, StepEnded
from tests.loop.helpers import WAIT, loss_step

pytestmark = pytest.mark.anyio


class HostNote(Event, kw_only=True):
    text: str


class OnCallersLoop:
    """An ``async def`` handler that records the thread it runs in and what it gets."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.threads: set[int] = set()

    async def __call__(self, event: Event) -> None:
        self.threads.add(threading.get_ident())
        self.events.append(event)

    def names(self) -> list[str]:
        """The loop's own events, in order."""
        return [type(e).__name__ for e in self.events if not isinstance(e, HostNote)]


async def test_the_run_has_a_loop_of_its_own_and_handlers_run_on_the_callers(
    tmp_path: Path,
) -> None:
    step_threads: set[int] = set()
    mid = threading.Event()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        step_threads.add(threading.get_ident())
        if step_idx == 5:
            mid.set()
            await anyio.to_thread.run_sync(resume.wait, WAIT)
        return {"loss": 1.0 / (step_idx + 1)}

    resume = threading.Event()
    early, late = OnCallersLoop(), OnCallersLoop()
    loop = ev.TrainingLoop(step, num_steps=20, output_dir=tmp_path, run_key="own")
    loop.subscribe(early)
    result: dict[str, ev.LoopArtifacts] = {}

    async def run() -> None:
        result["a"] = await loop.run(own_thread=True)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.to_thread.run_sync(mid.wait, WAIT)
            loop.subscribe(late, events=(HostNote, StepEnded))  # while it runs, from this loop
            loop.publish(HostNote(text="from the service"))  # the thread-safe path
            resume.set()
    here = threading.get_ident()
    assert result["a"].status == "completed" and result["a"].steps_completed == 20
    assert here not in step_threads and len(step_threads) == 1  # its own loop's thread
    assert early.threads == {here} and late.threads == {here}  # on the caller's loop
    assert early.names() == ["TrainStarted", *["StepEnded"] * 20, "TrainEnded"]
    assert [e.step for e in early.events if isinstance(e, StepEnded)] == list(range(20))
    notes = [e for e in late.events if isinstance(e, HostNote)]
    assert [(n.text, n.run_key) for n in notes] == [("from the service", "own")]
    with anyio.fail_after(WAIT):  # the run's thread ends with it
        for thread in threading.enumerate():
            if thread.name == "evsys-run:own":
                await anyio.to_thread.run_sync(thread.join, WAIT)
                assert not thread.is_alive()


async def test_steps_complete_while_the_callers_loop_is_blocked(tmp_path: Path) -> None:
    """The caller's loop is blocked outright (a long synchronous handler): every step of
    the run completes meanwhile. On the caller's loop the run could not take one."""
    num_steps = 200
    first, last = threading.Event(), threading.Event()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        await anyio.lowlevel.checkpoint()  # an awaiting step, on its own loop
        if step_idx == 0:
            first.set()
        if step_idx == num_steps - 1:
            last.set()
        return {"loss": 1.0}

    seen = OnCallersLoop()
    loop = ev.TrainingLoop(
        step, num_steps=num_steps, output_dir=tmp_path, run_key="b",
        callbacks=ev.build_callbacks([{"kind": "csv_metrics", "params": {"out_path": "m.csv"}}]),
    )  # fmt: skip
    loop.subscribe(seen)
    outcome: dict[str, Any] = {}

    async def run() -> None:
        outcome["a"] = await loop.run(own_thread=True)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.to_thread.run_sync(first.wait, WAIT)
            handled_before = len(seen.events)
            outcome["all_steps_while_blocked"] = last.wait(WAIT)  # blocks this loop
            outcome["handled_while_blocked"] = len(seen.events) - handled_before
    assert outcome["all_steps_while_blocked"] is True
    assert outcome["handled_while_blocked"] == 0  # this loop did nothing meanwhile
    assert outcome["a"].status == "completed" and outcome["a"].steps_completed == num_steps
    assert seen.names() == ["TrainStarted", *["StepEnded"] * num_steps, "TrainEnded"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "b" / "m.csv").read_text())))
    assert [int(r["step"]) for r in rows] == list(range(num_steps))


def _hanging_loop(tmp_path: Path, key: str, hung: threading.Event) -> ev.TrainingLoop:
    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 3:
            hung.set()
            await anyio.sleep_forever()
        return {"loss": 1.0}

    return ev.TrainingLoop(
        step, num_steps=100, output_dir=tmp_path, run_key=key,
        callbacks=ev.build_callbacks([
            {"kind": "csv_metrics", "params": {"out_path": "m.csv"}},
            {"kind": "local_logger", "params": {"print_every": 0}},
        ]),
    )  # fmt: skip


async def test_cancelling_the_awaiting_task_cancels_the_run_and_files_are_complete(
    tmp_path: Path,
) -> None:
    hung = threading.Event()
    loop = _hanging_loop(tmp_path, "c", hung)
    with anyio.fail_after(WAIT):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_when, hung, scope)
                await loop.run(own_thread=True)
        assert scope.cancelled_caught  # the cancellation propagated, after the shutdown
    _assert_cancelled_with_complete_files(loop, tmp_path / "c", steps=3)


async def test_a_native_asyncio_cancel_of_the_awaiting_task_too(
    tmp_path: Path, anyio_backend: str
) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("task.cancel() is asyncio's")
    import asyncio

    hung = threading.Event()
    loop = _hanging_loop(tmp_path, "n", hung)
    with anyio.fail_after(WAIT):
        task = asyncio.ensure_future(loop.run(own_thread=True))
        await anyio.to_thread.run_sync(hung.wait, WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    _assert_cancelled_with_complete_files(loop, tmp_path / "n", steps=3)


async def test_the_runs_exception_reaches_the_caller_unwrapped(tmp_path: Path) -> None:
    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 2:
            raise ValueError("nan loss")
        return {"loss": 1.0}

    loop = ev.TrainingLoop(step, num_steps=10, output_dir=tmp_path)
    with anyio.fail_after(WAIT), pytest.raises(ValueError, match="nan loss"):
        await loop.run(own_thread=True)
    assert loop.artifacts is not None and loop.artifacts.status == "failed"
    async with ev.EventBus() as bus:
        shared = ev.TrainingLoop(loss_step, num_steps=1, output_dir=tmp_path, bus=bus)
        with pytest.raises(ValueError, match="drop bus="):
            await shared.run(own_thread=True)


async def _cancel_when(flag: threading.Event, scope: anyio.CancelScope) -> None:
    await anyio.to_thread.run_sync(flag.wait, WAIT)
    scope.cancel()


def _assert_cancelled_with_complete_files(loop: ev.TrainingLoop, run_dir: Path, steps: int) -> None:
    artifacts = loop.artifacts
    assert artifacts is not None and artifacts.status == "cancelled"
    assert artifacts.steps_completed == steps
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "cancelled" and manifest["steps_completed"] == steps
    rows = list(csv.DictReader(io.StringIO((run_dir / "m.csv").read_text())))
    assert [int(r["step"]) for r in rows] == list(range(steps))
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])["event"]
    assert last["type"] == "TrainEnded" and last["status"] == "cancelled"
