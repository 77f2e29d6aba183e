"""TrainingLoop, the facade (``loop/_loop.py``): the original example's hooks in order,
callbacks as isolated subscribers, a ``def`` step's thread, a metric that is not a
number, a caller's shared bus.

Isolation and "nothing lost" are proven by counting, on asyncio and trio. Behind the
facade, a file per phase beside this one: ``test_arguments.py`` (arguments and run
dirs), ``test_steps.py`` (the steps and their boundary), ``test_barrier.py`` (stops and
steering callbacks), ``test_evals.py``, ``test_checkpoints.py`` (with resume) and
``test_shutdown.py``; ``test_seams.py`` (what the phases see), ``test_ranks.py`` (ranks
that agree on a stop).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.events import StepEnded, TrainEnded
from tests.loop.helpers import WAIT, Acc, AsyncRecorder, Recorder, loss_step

pytestmark = pytest.mark.anyio


async def test_original_example_every_hook_in_order(tmp_path: Path) -> None:
    rec, arec, acc = Recorder(), AsyncRecorder(), Acc(run_every=5)
    loop = ev.TrainingLoop(
        loss_step,
        num_steps=20,
        output_dir=tmp_path,
        run_key="seed",
        evaluators=[acc],
        callbacks=[rec, arec],
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert artifacts.steps_completed == 20
    assert rec.steps() == list(range(20))
    assert arec.steps == list(range(20))
    assert acc.calls == [4, 9, 14, 19]
    evals = [v for k, v in rec.calls if k == "eval"]
    assert evals == [(s, "val", {"acc": s / 100}) for s in (4, 9, 14, 19)]
    # the eval of step k comes after step k's event and before step k+1's
    assert rec.calls.index(("eval", evals[0])) == rec.calls.index(("step", 4)) + 1
    assert rec.calls[0] == ("start", 20)
    assert rec.calls[-1] == ("end", "completed")
    assert arec.status == "completed"
    assert artifacts.run_dir == tmp_path / "seed"
    assert artifacts.callback_report is not None
    assert artifacts.callback_report["Recorder"].delivered == 1 + 20 + 4 + 1
    assert artifacts.callback_report["Recorder"].pending == 0
    # on_train_end sees the artifacts before the drain: the report is still empty
    assert rec.ended is not None and rec.ended.callback_report == {}
    manifest = json.loads((tmp_path / "seed" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps_completed"] == 20
    assert artifacts.train_seconds > 0 and artifacts.drain_seconds > 0


async def test_blocked_def_callback_never_stalls_the_loop(tmp_path: Path) -> None:
    """A callback blocked on a threading.Event while every step completes."""
    release = threading.Event()
    n = 50

    class Blocked(ev.Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
            release.wait(30)
            self.steps.append(step_idx)

    blocked, sibling = Blocked(), AsyncRecorder()
    seen_when_last_step_ran: list[int] = []

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == n - 1:
            # every earlier step finished while the callback had handled nothing
            seen_when_last_step_ran.append(len(blocked.steps))
            release.set()
        return {"loss": 1.0}

    loop = ev.TrainingLoop(step, num_steps=n, output_dir=tmp_path, callbacks=[blocked, sibling])
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert seen_when_last_step_ran == [0]
    assert blocked.steps == list(range(n))  # nothing lost, in order, after the release
    assert sibling.steps == list(range(n))
    assert artifacts.status == "completed"


async def test_failing_callback_is_isolated_and_reported(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    class Boom(ev.Callback):
        async def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            raise RuntimeError(f"boom at {step_idx}")

    class Failures(ev.Callback):
        def __init__(self) -> None:
            self.events: list[ev.events.CallbackFailed] = []

        async def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
            if isinstance(event, ev.events.CallbackFailed):
                self.events.append(event)

    rec, failures = Recorder(), Failures()
    loop = ev.TrainingLoop(
        loss_step, num_steps=10, output_dir=tmp_path, callbacks=[Boom(), rec, failures]
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert rec.steps() == list(range(10))
    assert artifacts.callback_report is not None
    assert artifacts.callback_report["Boom"].failed == 10
    assert sum(f.count for f in failures.events) == 10  # coalesced: the first, then sums
    assert {f.hook for f in failures.events} == {"on_step_end"}
    text = warnings_log.text
    assert "callback failed: callback=Boom hook=on_step_end" in text
    assert "RuntimeError: boom at 0" in text and "Traceback" in text  # the first, in full
    assert "Boom: 9 more RuntimeError in on_step_end since" in text  # the rest, summed


async def test_def_step_runs_in_one_dedicated_thread(tmp_path: Path) -> None:
    threads: list[int] = []

    def step(state: ev.LoopState, step_idx: int) -> ev.StepOutput:
        threads.append(threading.get_ident())
        return ev.StepOutput(metrics={"loss": 1.0}, batch=[step_idx])

    class Batches(ev.Callback):
        wants_batch = True

        def __init__(self) -> None:
            self.batches: list[Any] = []

        async def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
            self.batches.append(batch)

    batches = Batches()
    loop = ev.TrainingLoop(step, num_steps=5, output_dir=tmp_path, callbacks=[batches])
    with anyio.fail_after(30):
        await loop.run()
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
    # only the newest batch is held: each handled step got its own or None
    assert all(b is None or b == [i] for i, b in enumerate(batches.batches))
    assert batches.batches[-1] == [4]


async def test_shared_bus_stays_open_and_run_ends_only_its_subscriptions(tmp_path: Path) -> None:
    seen: list[str] = []
    async with ev.EventBus() as bus:

        async def watcher(event: ev.Event) -> None:
            seen.append(type(event).__name__)

        bus.subscribe(watcher, events=(StepEnded, TrainEnded))
        rec = Recorder()
        loop = ev.TrainingLoop(
            loss_step, num_steps=3, output_dir=tmp_path, bus=bus, callbacks=[rec]
        )
        with anyio.fail_after(30):
            await loop.run()
        assert rec.calls[-1] == ("end", "completed")
        assert bus.stats()["Recorder"].delivered == 1 + 3 + 1
        bus.publish(StepEnded(step=99, num_steps=3))  # the caller's bus is still open
        await bus.drain(5)
        assert seen == ["StepEnded"] * 3 + ["TrainEnded", "StepEnded"]
        assert len(rec.steps()) == 3  # the run's callback is unsubscribed


async def test_non_numeric_metric_fails_the_step_clearly(tmp_path: Path) -> None:
    async def step(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        return {"loss": "low"}

    loop = ev.TrainingLoop(step, num_steps=5, output_dir=tmp_path, strict=True)
    with anyio.fail_after(WAIT):
        with pytest.raises(TypeError, match="metric 'loss' = 'low', which is not a number"):
            await loop.run()


async def test_run_on_a_shared_bus_does_not_wait_for_other_runs(tmp_path: Path) -> None:
    """A run's shutdown waits for its own callbacks only, not for another run's."""
    release = threading.Event()
    other_handled: list[int] = []
    async with ev.EventBus() as bus:

        def slow_other_run(event: ev.Event) -> None:
            release.wait(30)  # held until this run has returned
            other_handled.append(1)

        bus.subscribe(slow_other_run, events=(StepEnded,), run_key="other")
        bus.publish(StepEnded(step=0, num_steps=1, run_key="other"))
        rec = Recorder()
        loop = ev.TrainingLoop(
            loss_step, num_steps=3, output_dir=tmp_path, run_key="mine", bus=bus, callbacks=[rec]
        )
        with anyio.fail_after(20):
            artifacts = await loop.run()
        assert other_handled == []  # it returned while the other run's callback was held
        assert rec.steps() == [0, 1, 2]
        assert artifacts.callback_report is not None
        assert artifacts.callback_report["Recorder"].pending == 0
        release.set()
