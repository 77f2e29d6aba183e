"""Evaluators (``loop/_evals.py``): due ones run concurrently, inline or in the
background while training goes on; a failure or a timeout is the evaluator's alone,
reported as ``EvalFailed`` and one log line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

import evsys_async as ev
from evsys_async.events import EvalFailed
from evsys_async.state import EvalTally
from tests.loop.helpers import Acc, Recorder, loss_step

pytestmark = pytest.mark.anyio


async def test_evaluators_run_concurrently_and_failures_are_isolated(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    a_started, b_started = anyio.Event(), anyio.Event()

    class Waits:
        def __init__(self, name: str, mine: anyio.Event, other: anyio.Event) -> None:
            self.name, self.run_every, self.mine, self.other = name, 2, mine, other

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            self.mine.set()
            await self.other.wait()  # deadlocks unless both run at once
            return {"x": 1.0}

    class Fails:
        name, run_every = "broken", 2

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            raise ConnectionError("eval server down")

    class Hangs:
        name, run_every = "hangs", 4

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            await anyio.sleep_forever()
            raise AssertionError  # pragma: no cover

    class Failed(ev.Callback):
        def __init__(self) -> None:
            self.events: list[EvalFailed] = []

        async def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
            if isinstance(event, EvalFailed):
                self.events.append(event)

    failed, rec = Failed(), Recorder()
    loop = ev.TrainingLoop(
        loss_step,
        num_steps=4,
        output_dir=tmp_path,
        evaluators=[
            Waits("a", a_started, b_started),
            Waits("b", b_started, a_started),
            Fails(),
            Hangs(),
        ],
        callbacks=[failed, rec],
        eval_timeout=0.2,
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert [(e.step, e.eval_name) for e in failed.events] == [
        (1, "broken"),
        (3, "broken"),
        (3, "hangs"),
    ]
    assert failed.events[-1].error == "timeout after 0.2s"
    assert "ConnectionError: eval server down" in failed.events[0].error
    assert [v[:2] for k, v in rec.calls if k == "eval"] == [(1, "a"), (1, "b"), (3, "a"), (3, "b")]
    assert "evaluator failed" in warnings_log.text


async def test_background_evals_let_training_go_on(tmp_path: Path) -> None:
    release = anyio.Event()
    progressed: list[int] = []

    class Slow:
        name, run_every = "slow", 3

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            if step_idx == 2:
                await release.wait()  # released by a later step: training went on
            return {"seen_model": float(state.model)}

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        progressed.append(step_idx)
        if step_idx == 6:
            release.set()
        return {}

    rec = Recorder()
    loop = ev.TrainingLoop(
        step,
        num_steps=9,
        output_dir=tmp_path,
        evaluators=[Slow()],
        callbacks=[rec],
        eval_mode="background",
        max_evals_in_flight=4,
        snapshot=lambda state: state.step * 10,
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert progressed == list(range(9))
    evals = sorted(v for k, v in rec.calls if k == "eval")
    # each EvalEnded carries the step it evaluated and the snapshot taken then
    assert evals == [(2, "slow", {"seen_model": 20.0}), (5, "slow", {"seen_model": 50.0}),
                     (8, "slow", {"seen_model": 80.0})]  # fmt: skip
    assert rec.calls[-1] == ("end", "completed")
    assert artifacts.status == "completed"


async def test_an_eval_timeout_is_one_line_without_a_traceback(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    class Hangs:
        name, run_every = "hangs", 2

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            await anyio.Event().wait()  # never set: only the timeout ends it
            return {}

    loop = ev.TrainingLoop(
        loss_step, num_steps=2, output_dir=tmp_path, evaluators=[Hangs()], eval_timeout=0.05
    )
    with anyio.fail_after(30):
        assert (await loop.run()).status == "completed"
    [record] = [r for r in warnings_log.records if "evaluator failed" in r.getMessage()]
    assert "error=timeout after 0.05s" in record.getMessage()
    assert record.exc_info is None and "Traceback" not in warnings_log.text
    assert "CancelledError" not in warnings_log.text and "Cancelled" not in warnings_log.text


async def test_an_eval_failure_is_one_warning_line_and_each_evaluator_is_tallied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="evsys_async")

    class Down:
        name, run_every = "down", 2

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            if step_idx == 5:
                return {"acc": 1.0}
            raise ConnectionError(f"eval server down at {step_idx}")

    class Hangs:
        name, run_every = "hangs", 3

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            if step_idx == 2:
                await anyio.Event().wait()  # never set: only the timeout ends it
            return {"acc": 0.5}

    loop = ev.TrainingLoop(
        loss_step, num_steps=6, output_dir=tmp_path, evaluators=[Down(), Acc("ok", 3), Hangs()],
        eval_timeout=0.05,
    )  # fmt: skip
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert artifacts.evals == {
        "down": EvalTally(runs=3, failed=2, first_error="ConnectionError: eval server down at 1"),
        "ok": EvalTally(runs=2, failed=0),
        "hangs": EvalTally(runs=2, failed=1, first_error="timeout after 0.05s"),
    }
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "evaluator failed; training goes on: evaluator=down step=1 "
        "error=ConnectionError: eval server down at 1",
        "evaluator failed; training goes on: evaluator=hangs step=2 error=timeout after 0.05s",
        "evaluator failed; training goes on: evaluator=down step=3 "
        "error=ConnectionError: eval server down at 3",
    ]
    assert all(r.exc_info is None for r in warnings)  # one line each, no library traceback
    # the traceback is at DEBUG, for the exceptions (a timeout's would be the runtime's)
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert [(r.exc_info[0], str(r.exc_info[1])) for r in debug if r.exc_info] == [
        (ConnectionError, "eval server down at 1"),
        (ConnectionError, "eval server down at 3"),
    ]
