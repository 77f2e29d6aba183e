"""The shutdown (``loop/_shutdown.py``): the one way every run ends.

A failed step, a callback error in ``raise`` mode, a cancellation from outside (anyio's
or asyncio's ``task.cancel()``): the drain and the teardown run first, all under one
``drain_timeout`` (in-flight evals included), and what ended the run propagates after
them; a callback stuck past the deadline is named and torn down when its call returns.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from tests.loop.helpers import WAIT, AsyncRecorder, Recorder, loss_step

pytestmark = pytest.mark.anyio


async def test_step_that_raises_is_reraised_after_the_drain(tmp_path: Path) -> None:
    rec, arec = Recorder(), AsyncRecorder()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 7:
            raise ValueError("nan loss")
        return {"loss": 1.0}

    loop = ev.TrainingLoop(step, num_steps=20, output_dir=tmp_path, callbacks=[rec, arec])
    with anyio.fail_after(30), pytest.raises(ValueError, match="nan loss"):
        await loop.run()
    assert rec.steps() == list(range(7))
    assert rec.calls[-1] == ("end", "failed")
    assert arec.status == "failed"
    artifacts = loop.artifacts
    assert artifacts is not None and artifacts.status == "failed"
    assert artifacts.error == "ValueError: nan loss"
    assert set(artifacts.callback_report) == {"Recorder", "AsyncRecorder"}  # shutdown ran first


async def test_outer_cancellation_runs_the_shutdown_then_propagates(tmp_path: Path) -> None:
    rec, arec = Recorder(), AsyncRecorder()
    slow_release = threading.Event()

    class SlowDef(ev.Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            slow_release.wait(30)
            self.steps.append(step_idx)

    slow = SlowDef()
    with anyio.CancelScope() as scope:

        async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
            if step_idx == 12:
                slow_release.set()
                scope.cancel()
                await anyio.sleep_forever()
            return {"loss": 1.0}

        loop = ev.TrainingLoop(
            step, num_steps=1000, output_dir=tmp_path, callbacks=[rec, arec, slow]
        )
        with anyio.fail_after(30):
            await loop.run()
        pytest.fail("run() must propagate the cancellation")  # pragma: no cover
    assert scope.cancelled_caught
    assert rec.steps() == list(range(12))
    assert slow.steps == list(range(12))  # the drain waited for the slow callback
    assert arec.steps == list(range(12))
    assert rec.calls[-1] == ("end", "cancelled")
    assert arec.status == "cancelled"
    assert loop.artifacts is not None and loop.artifacts.status == "cancelled"


async def test_callback_errors_raise_ends_the_run_before_the_next_step(tmp_path: Path) -> None:
    class Boom(ev.Callback):
        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            if step_idx == 2:
                raise KeyError("bad key")

    stepped: list[int] = []

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        stepped.append(step_idx)
        return {}

    rec = Recorder()
    loop = ev.TrainingLoop(
        step, num_steps=50, output_dir=tmp_path, callbacks=[Boom(), rec], callback_errors="raise"
    )
    with anyio.fail_after(30), pytest.raises(KeyError, match="bad key"):
        await loop.run()
    assert stepped == [0, 1, 2]
    assert loop.artifacts is not None and loop.artifacts.status == "failed"
    assert rec.calls[-1] == ("end", "failed")


async def test_callback_stuck_past_the_deadline_is_named_and_torn_down_later(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    """One drain_timeout bounds the shutdown; teardown runs when the call returns."""
    release = threading.Event()
    torn_down = threading.Event()
    teardown_thread: list[int] = []

    class Hung(ev.Callback):
        def __init__(self) -> None:
            self.handled: list[int] = []
            self.thread = 0

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            self.thread = threading.get_ident()
            if step_idx == 1:
                release.wait(60)
            self.handled.append(step_idx)

        def teardown(self, state: ev.LoopState) -> None:
            teardown_thread.append(threading.get_ident())
            torn_down.set()

    hung, rec = Hung(), Recorder()
    loop = ev.TrainingLoop(
        loss_step, num_steps=5, output_dir=tmp_path, callbacks=[hung, rec], drain_timeout=0.5
    )
    with anyio.fail_after(20):
        artifacts = await loop.run()
    assert rec.calls[-1] == ("end", "completed")  # siblings complete
    report = artifacts.callback_report
    assert report is not None
    assert report["Hung"].stuck
    assert not report["Recorder"].stuck
    assert "callbacks left behind" in warnings_log.text
    assert not torn_down.is_set()
    release.set()
    with anyio.fail_after(20):
        while not torn_down.is_set():
            await anyio.sleep(0.01)
    assert teardown_thread == [hung.thread]  # in its own thread, after the hung call


async def test_raise_mode_failure_in_on_train_start_runs_no_step(tmp_path: Path) -> None:
    stepped: list[int] = []

    class Boom(ev.Callback):
        def on_train_start(self, state: ev.LoopState) -> None:
            raise RuntimeError("cannot open the log")

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        stepped.append(step_idx)
        return {}

    loop = ev.TrainingLoop(
        step, num_steps=5, output_dir=tmp_path, callbacks=[Boom()], callback_errors="raise"
    )
    with anyio.fail_after(30), pytest.raises(RuntimeError, match="cannot open the log"):
        await loop.run()
    assert stepped == []
    assert loop.artifacts is not None
    assert loop.artifacts.status == "failed"


async def test_in_flight_background_evals_count_in_the_one_shutdown_deadline(
    tmp_path: Path,
) -> None:
    class Hangs:
        name, run_every = "hangs", 1

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            await anyio.sleep_forever()
            raise AssertionError  # pragma: no cover

    loop = ev.TrainingLoop(
        loss_step,
        num_steps=1,
        output_dir=tmp_path,
        evaluators=[Hangs()],
        eval_mode="background",
        drain_timeout=0.5,
    )
    with anyio.fail_after(20):
        artifacts = await loop.run()
    # waiting for the eval is part of the shutdown: it shows in drain_seconds
    assert artifacts.drain_seconds >= 0.45
    assert artifacts.status == "completed"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_asyncio_cancels_do_not_skip_the_shutdown(tmp_path: Path) -> None:
    """uvicorn-style task.cancel(), twice, while a def callback is behind."""
    import asyncio

    release = threading.Event()

    class Slow(ev.Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.torn_down = False

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            release.wait(30)
            self.steps.append(step_idx)

        def teardown(self, state: ev.LoopState) -> None:
            self.torn_down = True

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        await asyncio.sleep(0)
        return {}

    with anyio.fail_after(WAIT):
        for shared in (False, True):
            slow = Slow()
            release.clear()
            async with ev.EventBus() as bus:
                loop = ev.TrainingLoop(
                    step, num_steps=10**6, output_dir=tmp_path, callbacks=[slow],
                    bus=bus if shared else None,
                )  # fmt: skip
                task = asyncio.ensure_future(loop.run())
                while loop.artifacts is None or loop.artifacts.steps_completed < 20:
                    await asyncio.sleep(0)
                task.cancel()
                while not (loop.state and loop.state.artifacts):  # the shutdown has begun
                    await asyncio.sleep(0)
                task.cancel()  # a second one, inside the shielded shutdown
                release.set()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, 30)
            assert loop.artifacts is not None
            assert loop.artifacts.status == "cancelled"
            assert slow.steps == list(range(loop.artifacts.steps_completed))
            assert slow.torn_down
            assert loop.artifacts.callback_report is not None


class Degrades(ev.Callback):
    """A writer that loses rows from step 4 on (a full disk), and says so."""

    def __init__(self) -> None:
        self.ended: str | None = None

    def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
        if step_idx == 4 and self.degraded is None:
            self.degraded = ev.Degraded("disk full", rows_lost=6, missing_from_step=4)

    def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        self.ended = artifacts.status


@pytest.mark.parametrize("strict", [False, True])
async def test_a_degraded_callback_fails_the_run_only_under_strict(
    tmp_path: Path, strict: bool
) -> None:
    cb = Degrades()
    loop = ev.TrainingLoop(
        loss_step, num_steps=10, output_dir=tmp_path, callbacks=[cb], strict=strict
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()  # training itself went well: nothing is raised
    assert artifacts.steps_completed == 10
    manifest = (artifacts.run_dir / "manifest.json").read_text()
    if not strict:
        assert artifacts.status == cb.ended == "completed" and artifacts.error is None
        assert '"status": "completed"' in manifest
        return
    assert artifacts.status == cb.ended == "failed"  # TrainEnded said so too
    assert artifacts.error == (
        "strict: callback 'Degrades' is degraded: disk full, 6 rows lost from step 4"
    )
    assert '"status": "failed"' in manifest


async def test_strict_fails_a_run_whose_callback_setup_failed(tmp_path: Path) -> None:
    class NoSetup(ev.Callback):
        def setup(self, state: ev.LoopState) -> None:
            raise ConnectionError("tracking server down")

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            pass

    loop = ev.TrainingLoop(
        loss_step, num_steps=5, output_dir=tmp_path, callbacks=[NoSetup()], strict=True
    )
    with anyio.fail_after(WAIT), pytest.raises(ConnectionError, match="server down"):
        await loop.run()  # strict: the callback's error, re-raised after the shutdown
    artifacts = loop.artifacts
    assert artifacts is not None and artifacts.status == "failed"
    health = artifacts.callback_report["NoSetup"]
    assert sum(health.hook_failures.values()) == 1 and not health.ok
    assert artifacts.error == ("callback 'NoSetup' failed: ConnectionError: tracking server down")
