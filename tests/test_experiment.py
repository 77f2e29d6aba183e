"""Experiment: arms x repeats under experiment-scope hooks, in the original system's order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev

pytestmark = pytest.mark.anyio

WAIT = 30.0  # the fail_after around every wait: generous, never reached when all is well


def make_step(gain: float) -> Any:
    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"loss": 1.0 / (1 + gain * step_idx)}

    return step


class Score:
    name, run_every = "val", 2

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        gain = state.ctx.run_config["gain"]
        return {"acc": gain * (step_idx + 1) / 10 + state.ctx.run_config["seed"] / 1000}


class Hooks(ev.Callback):
    """Records experiment- and loop-scope hooks; writes ctx.ids for the next one."""

    def __init__(self, log: list[Any], tag: str) -> None:
        self.log, self.tag = log, tag

    async def on_experiment_start(self, ctx: ev.LogContext) -> None:
        self.log.append((self.tag, "experiment_start"))
        ctx.ids.setdefault("first", self.tag)

    def on_group_start(self, ctx: ev.LogContext, group_name: str) -> None:
        self.log.append((self.tag, "group_start", group_name))

    async def on_run_start(self, ctx: ev.LogContext) -> None:
        self.log.append((self.tag, "run_start", ctx.run_key, ctx.ids["first"]))

    async def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        self.log.append((self.tag, "train_end", state.ctx.run_key, artifacts.status))

    def on_run_end(self, ctx: ev.LogContext, run_result: Any, arm: Any) -> None:
        self.log.append((self.tag, "run_end", run_result.run_key, arm.name))

    async def on_experiment_end(self, ctx: ev.LogContext, result: Any) -> None:
        self.log.append((self.tag, "experiment_end", result.best_arm))


async def test_original_hook_order_shared_callbacks_and_best_arm(tmp_path: Path) -> None:
    log: list[Any] = []
    arms = [
        ev.Arm("slow", make_step(0.1), params={"gain": 0.5}),
        ev.Arm("fast", make_step(1.0), params={"gain": 1.0}),
    ]
    exp = ev.Experiment(
        "sweep",
        arms,
        num_steps=4,
        repeats=2,
        output_dir=tmp_path,
        callbacks=[Hooks(log, "a"), Hooks(log, "b")],
        evaluators=[Score()],
        success_metric="val/acc",
    )
    with anyio.fail_after(30):
        result = await exp.run()
    assert result.best_arm == "fast"
    assert result.arms["fast"].mean["val/acc"] == pytest.approx(0.4 + 0.0005)  # seeds 0 and 1
    assert [r.status for a in result.arms.values() for r in a.runs] == ["completed"] * 4
    a_log = [e[1:] for e in log if e[0] == "a"]
    assert a_log == [
        ("experiment_start",),
        ("group_start", "slow"),
        ("run_start", "slow-r0", "a"),
        ("train_end", "slow-r0", "completed"),
        ("run_end", "slow-r0", "slow"),
        ("run_start", "slow-r1", "a"),
        ("train_end", "slow-r1", "completed"),
        ("run_end", "slow-r1", "slow"),
        ("group_start", "fast"),
        ("run_start", "fast-r0", "a"),
        ("train_end", "fast-r0", "completed"),
        ("run_end", "fast-r0", "fast"),
        ("run_start", "fast-r1", "a"),
        ("train_end", "fast-r1", "completed"),
        ("run_end", "fast-r1", "fast"),
        ("experiment_end", "fast"),
    ]
    # dispatch goes in list order: a before b at every experiment-scope hook
    exp_hooks = [e for e in log if e[1] != "train_end"]
    assert [e[0] for e in exp_hooks[:2]] == ["a", "b"]
    assert (tmp_path / "sweep" / "fast-r1" / "manifest.json").exists()


async def test_concurrent_arms_get_fresh_callbacks(tmp_path: Path) -> None:
    built: list[Any] = []
    log: list[Any] = []

    def factory() -> list[ev.Callback]:
        cb = Hooks(log, f"run{len(built)}")
        built.append(cb)
        return [cb]

    exp_log: list[Any] = []
    exp = ev.Experiment(
        "par",
        [ev.Arm(f"arm{i}", make_step(i + 1), params={"gain": i + 1}) for i in range(3)],
        num_steps=3,
        output_dir=tmp_path,
        callbacks=[Hooks(exp_log, "exp")],
        callback_factory=factory,
        evaluators=[Score()],
        success_metric="acc",
        max_concurrency=3,
    )
    with anyio.fail_after(30):
        result = await exp.run()
    assert len(built) == 3
    assert result.best_arm == "arm2"
    ends = sorted(e[2] for e in log if e[1] == "train_end")
    assert ends == ["arm0", "arm1", "arm2"]
    assert {e[1] for e in exp_log} == {"experiment_start", "group_start", "experiment_end"}


async def test_failed_run_is_recorded_and_the_experiment_goes_on(tmp_path: Path) -> None:
    async def broken(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        raise RuntimeError("diverged")

    exp = ev.Experiment(
        "f",
        [
            ev.Arm("bad", broken, params={"gain": 1}),
            ev.Arm("good", make_step(1), params={"gain": 1}),
        ],
        num_steps=2,
        output_dir=tmp_path,
        evaluators=[Score()],
        success_metric="acc",
    )
    with anyio.fail_after(30):
        result = await exp.run()
    bad = result.arms["bad"].runs[0]
    assert bad.status == "failed" and bad.error == "RuntimeError: diverged"
    assert result.best_arm == "good"


def test_concurrency_without_a_factory_warns_about_loop_hooks(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    class LoopOnly(ev.Callback):
        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            pass

    ev.Experiment(
        "w",
        [ev.Arm("a", make_step(1)), ev.Arm("b", make_step(2))],
        num_steps=1,
        output_dir=tmp_path,
        callbacks=[LoopOnly()],
        max_concurrency=2,
    )
    assert "pass callback_factory" in warnings_log.text
    assert "LoopOnly" in warnings_log.text


async def test_each_experiment_claims_a_new_dir(tmp_path: Path) -> None:
    dirs = []
    for _ in range(2):
        exp = ev.Experiment(
            "sweep",
            [ev.Arm("a", make_step(1.0), params={"gain": 1.0})],
            num_steps=2,
            output_dir=tmp_path,
            evaluators=[Score()],
            success_metric="val/acc",
        )
        with anyio.fail_after(30):
            result = await exp.run()
        dirs.append(exp.output_dir)
        [run] = result.arms["a"].runs
        assert run.artifacts is not None and run.artifacts.run_dir == exp.output_dir / "a"
        assert run.metrics  # the evals of its claimed run key were recorded
    assert dirs == [tmp_path / "sweep", tmp_path / "sweep-1"]
