"""Many runs in one process, on one event loop: each with its own run key, run dir
and callbacks; one failing or slow run neither fails nor holds up the others.

Proven by counting (steps done, events delivered) while the slow run is held,
never by a clock.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from tests.servers import load_example

pytestmark = pytest.mark.anyio

NUM_STEPS = 40


class Count(ev.Callback):
    """Counts this run's steps; ``block`` holds its thread on the first one."""

    def __init__(self, block: threading.Event | None = None) -> None:
        self.steps = 0
        self.block = block

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
        if self.block is not None:
            self.block.wait(30)
        self.steps += 1


async def test_a_failing_and_a_slow_run_do_not_fail_or_hold_up_the_others(
    tmp_path: Path,
) -> None:
    held = anyio.Event()  # the slow run's step 5 waits for it
    at_hold = anyio.Event()
    stuck = threading.Event()  # the slow run's def callback waits for it

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        kind = state.ctx.run_config["kind"]
        if kind == "fails" and step_idx == 10:
            raise FloatingPointError("loss is nan")
        if kind == "slow" and step_idx == 5:
            at_hold.set()
            await held.wait()
        return {"loss": 1.0 / (step_idx + 1)}

    kinds = {"ok-a": "ok", "ok-b": "ok", "fails": "fails", "slow": "slow"}
    counters = {key: Count(stuck if kind == "slow" else None) for key, kind in kinds.items()}
    outcome: dict[str, Any] = {}
    loops: dict[str, ev.TrainingLoop] = {}

    others_ended = anyio.Event()

    async def run_one(loop: ev.TrainingLoop) -> None:
        try:
            outcome[loop.run_key] = (await loop.run()).status
        except Exception as exc:  # this run's failure: its siblings go on
            outcome[loop.run_key] = exc
        if len(set(outcome) - {"slow"}) == 3:
            others_ended.set()

    with anyio.fail_after(60):
        async with ev.EventBus() as bus, anyio.create_task_group() as tg:
            for key, kind in kinds.items():
                logger = {"kind": "local_logger", "params": {"print_every": 0}}
                callbacks = [counters[key], *ev.build_callbacks([logger])]
                loops[key] = loop = ev.TrainingLoop(
                    step, num_steps=NUM_STEPS, output_dir=tmp_path, run_key=key,
                    callbacks=callbacks, bus=bus,
                )  # fmt: skip
                loop.ctx.run_config["kind"] = kind
                tg.start_soon(run_one, loop)
            await at_hold.wait()
            await others_ended.wait()  # the others end while "slow" is held
            # everything but "slow" has ended and its callbacks have had every event,
            # while "slow" is held at step 5 and its callback is stuck on its first event
            others_done = {k: counters[k].steps for k in kinds if k != "slow"}
            slow_steps = loops["slow"].artifacts.steps_completed  # type: ignore[union-attr]
            slow_delivered = counters["slow"].steps
            held.set()
            stuck.set()
    assert others_done == {"ok-a": NUM_STEPS, "ok-b": NUM_STEPS, "fails": 10}
    assert (slow_steps, slow_delivered) == (5, 0)
    assert outcome["ok-a"] == outcome["ok-b"] == outcome["slow"] == "completed"
    assert isinstance(outcome["fails"], FloatingPointError)
    assert counters["slow"].steps == NUM_STEPS  # held back, never lost
    for key in kinds:  # each run's own files, with its own events only
        lines = (tmp_path / key / "events.jsonl").read_text().splitlines()
        keys = {json.loads(line)["event"]["run_key"] for line in lines if '"seq"' in line}
        assert keys <= {key, ""}
        manifest = json.loads((tmp_path / key / "manifest.json").read_text())
        assert manifest["run_key"] == key
    assert json.loads((tmp_path / "fails" / "manifest.json").read_text())["status"] == "failed"


async def test_the_sweep_example(tmp_path: Path) -> None:
    example = load_example("many_runs")
    with anyio.fail_after(60):
        results = await example.main(str(tmp_path), lrs=(0.1, 1.5))
    assert results == {
        "lr-0.1": "completed after 200 steps",
        "lr-1.5": "failed: diverged at lr=1.5",
    }
    for key in results:
        assert (tmp_path / key / "metrics.csv").exists()
        assert (tmp_path / key / "events.jsonl").exists()
