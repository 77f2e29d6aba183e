"""Stops and steering callbacks (``loop/_barrier.py``, ``loop/_boundary.py``).

A stop decided by a ``controls_loop`` callback is honoured before the next step; a stop
requested from any hook ends the run at a step boundary; a steering callback past
``control_timeout`` is counted and the loop goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.events import StopRequested
from tests.loop.helpers import Acc, Recorder

pytestmark = pytest.mark.anyio


async def test_early_stop_by_controls_loop_callback_is_exact(tmp_path: Path) -> None:
    """A stop decided on the eval after step k is honoured before step k+1."""

    class StopAtNine(ev.Callback):
        controls_loop = True

        async def on_eval(self, state: ev.LoopState, step_idx: int, name: str, m: Any) -> None:
            await anyio.lowlevel.checkpoint()  # the loop must wait for this
            if step_idx == 9:
                state.request_stop("acc plateaued")

    stepped: list[int] = []

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        stepped.append(step_idx)
        return {"loss": 1.0}

    rec = Recorder()
    loop = ev.TrainingLoop(
        step,
        num_steps=100,
        output_dir=tmp_path,
        evaluators=[Acc(run_every=5)],
        callbacks=[StopAtNine(), rec],
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert stepped == list(range(10))
    assert artifacts.status == "stopped"
    assert artifacts.stop_reason == "acc plateaued"
    assert artifacts.steps_completed == 10
    assert rec.calls[-1] == ("end", "stopped")


async def test_stop_from_any_hook_ends_at_a_step_boundary(tmp_path: Path) -> None:
    class Stopper(ev.Callback):
        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            if step_idx == 3:
                state.request_stop("enough", failed=True)

    class Events(ev.Callback):
        def __init__(self) -> None:
            self.stops: list[StopRequested] = []

        def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
            if isinstance(event, StopRequested):
                self.stops.append(event)

    events = Events()
    release = anyio.Event()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if state.stop_requested:
            release.set()
        await anyio.lowlevel.checkpoint()
        return {}

    loop = ev.TrainingLoop(
        step, num_steps=10_000, output_dir=tmp_path, callbacks=[Stopper(), events]
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "failed"  # request_stop(failed=True)
    assert artifacts.stop_reason == "enough"
    assert 4 <= artifacts.steps_completed < 10_000
    assert [(s.reason, s.source) for s in events.stops] == [("enough", "Stopper")]


async def test_control_timeout_is_counted_and_the_loop_goes_on(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    gate = anyio.Event()

    class Stuck(ev.Callback):
        controls_loop = True

        async def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            if step_idx == 0:
                await gate.wait()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 2:
            gate.set()
        return {}

    loop = ev.TrainingLoop(
        step, num_steps=3, output_dir=tmp_path, callbacks=[Stuck()], control_timeout=0.05
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.callback_report is not None
    assert artifacts.callback_report["Stuck"].control_timeouts >= 1
    assert "control callback did not keep up" in warnings_log.text
