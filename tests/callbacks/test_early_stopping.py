"""early_stopping: stops at exactly the eval the original stops at; NaN, strict, resume, subclassing."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import evsys_async as ev
from evsys_async.callbacks.early_stopping import EarlyStoppingCallback
from tests.callbacks.helpers import WAIT


def original_stop_index(
    values: Sequence[float], patience: int, mode: str, min_delta: float
) -> int | None:
    """The original EarlyStoppingCallback.on_eval, verbatim in effect: the index of the
    eval on which it first calls request_stop, or None."""
    best: float | None = None
    staleness = 0
    for i, v in enumerate(values):
        if best is None:
            best = v
            continue
        improved = v > best + min_delta if mode == "max" else v < best - min_delta
        if improved:
            best = v
            staleness = 0
        else:
            staleness += 1
            if staleness >= patience:
                return i
    return None


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends (the hook is pure arithmetic)."""
    with pytest.raises(StopIteration):
        coro.send(None)


def feed(
    cb: EarlyStoppingCallback,
    values: Sequence[float],
    eval_name: str = "val",
    metric: str | None = None,
) -> tuple[ev.LoopState, int | None]:
    state = ev.LoopState(num_steps=1000)
    run(cb.on_train_start(state))
    for i, v in enumerate(values):
        run(cb.on_eval(state, i, eval_name, {metric or cb.metric: v}))
        if state.stop_requested:
            return state, i
    return state, None


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), max_size=30)
    | st.lists(st.sampled_from([0.1, 0.2, 0.3, 0.3, 0.3]), max_size=30),
    patience=st.integers(1, 5),
    mode=st.sampled_from(["max", "min"]),
    min_delta=st.sampled_from([0.0, 0.01, 0.5]),
)
def test_stops_at_the_same_eval_as_the_original(
    values: list[float], patience: int, mode: str, min_delta: float
) -> None:
    cb = EarlyStoppingCallback("acc", patience=patience, mode=mode, min_delta=min_delta)  # type: ignore[arg-type]
    _, stopped = feed(cb, values)
    assert stopped == original_stop_index(values, patience, mode, min_delta)


def test_reason_and_plateau() -> None:
    cb = EarlyStoppingCallback("acc", patience=2)
    state, stopped = feed(cb, [0.1, 0.5, 0.5, 0.4, 0.9])
    assert stopped == 3
    assert state.stop_reason is not None and "acc did not improve for 2 evals" in state.stop_reason
    assert "best 0.5000 at step 2" in state.stop_reason  # as people count and read them
    assert not state.stop_failed


def test_other_evals_and_other_metrics_are_ignored() -> None:
    cb = EarlyStoppingCallback("acc", eval_name="val", patience=1)
    state = ev.LoopState()
    run(cb.on_train_start(state))
    for i in range(5):
        run(cb.on_eval(state, i, "test", {"acc": 0.0}))
        run(cb.on_eval(state, i, "val", {"loss": 1.0}))
    assert not state.stop_requested
    assert cb.best is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_stops_at_once(bad: float) -> None:
    state, stopped = feed(EarlyStoppingCallback("loss", mode="min", patience=10), [1.0, 0.5, bad])
    assert stopped == 2
    assert f"loss is {bad}" in (state.stop_reason or "")
    _, stopped = feed(
        EarlyStoppingCallback("loss", mode="min", patience=2, check_finite=False), [1.0, bad, bad]
    )
    assert stopped == original_stop_index([1.0, bad, bad], 2, "min", 0.0)  # off: the original rule


def test_strict_fails_when_the_metric_never_appears_by_the_second_eval() -> None:
    cb = EarlyStoppingCallback("acc", strict=True)
    state = ev.LoopState()
    run(cb.on_train_start(state))
    run(cb.on_eval(state, 0, "val", {"accuracy": 0.1}))
    assert not state.stop_requested
    run(cb.on_eval(state, 1, "val", {"accuracy": 0.2}))
    assert state.stop_requested and state.stop_failed
    assert "metric 'acc' never appeared in 2 evals (metrics seen: accuracy)" in (
        state.stop_reason or ""
    )
    lax = EarlyStoppingCallback("acc")
    state, stopped = feed(lax, [0.1, 0.2], metric="accuracy")
    assert stopped is None


def test_baseline_relative_delta_and_min_mode() -> None:
    # baseline: the first value must beat it, else it counts as no improvement
    _, stopped = feed(EarlyStoppingCallback("acc", patience=2, baseline=0.9), [0.5, 0.6, 0.95])
    assert stopped == 1
    # relative: 10% of |best|
    cb = EarlyStoppingCallback(
        "loss", mode="min", patience=1, min_delta=0.1, min_delta_mode="relative"
    )
    assert cb.is_improvement(0.89, 1.0) and not cb.is_improvement(0.91, 1.0)
    assert cb.is_improvement(-1.11, -1.0) and not cb.is_improvement(-1.09, -1.0)


def test_subclass_overrides_the_improvement_test() -> None:
    class AnyChange(EarlyStoppingCallback):
        def is_improvement(self, value: float, best: float) -> bool:
            return value != best

    _, stopped = feed(AnyChange("acc", patience=2), [0.5, 0.4, 0.4, 0.4])
    assert stopped == 3


def test_state_dict_round_trip_survives_on_train_start() -> None:
    cb = EarlyStoppingCallback("acc", patience=3)
    feed(cb, [0.5, 0.4, 0.3])
    saved = cb.state_dict()
    assert saved["best"] == 0.5 and saved["wait"] == 2
    resumed = EarlyStoppingCallback("acc", patience=3)
    resumed.load_state_dict(saved)
    state = ev.LoopState()
    run(resumed.on_train_start(state))  # a resume: the loaded state stands
    run(resumed.on_eval(state, 10, "val", {"acc": 0.45}))
    assert state.stop_requested
    # a fresh run on the same instance (an experiment's next arm) starts afresh
    state2 = ev.LoopState()
    run(resumed.on_train_start(state2))
    assert resumed.best is None and resumed.wait == 0


def test_config_and_class_attributes() -> None:
    (cb,) = ev.build_callbacks(
        [{"kind": "early_stopping", "params": {"metric": "acc", "mode": "min", "patience": 2}}]
    )
    assert isinstance(cb, EarlyStoppingCallback) and cb.controls_loop
    with pytest.raises(ev.ConfigError, match="did you mean 'patience'"):
        ev.build_callbacks([{"kind": "early_stopping", "params": {"metric": "acc", "patiense": 2}}])
    with pytest.raises(ev.ConfigError, match="mode"):
        ev.build_callbacks(
            [{"kind": "early_stopping", "params": {"metric": "acc", "mode": "maximum"}}]
        )


# -- in the loop: the stop lands before the next step, as in the synchronous original -------


class Plateau:
    """acc rises to 0.5 at step 9 and stays there; evals every 5 steps."""

    name = "val"
    run_every = 5

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"acc": min(step_idx, 9) / 18}


@pytest.mark.anyio
async def test_in_the_loop_stops_before_the_next_step(tmp_path: Path) -> None:
    steps: list[int] = []

    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        steps.append(i)
        return {"loss": 1.0}

    values = [min(k, 9) / 18 for k in range(4, 100, 5)]
    k = original_stop_index(values, 2, "max", 0.0)
    assert k is not None
    stop_step = 4 + 5 * k  # evals after steps 4, 9, 14, ...: the original stops after step 19
    cb = EarlyStoppingCallback("acc", patience=2)
    loop = ev.TrainingLoop(
        step, num_steps=100, output_dir=tmp_path, evaluators=[Plateau()], callbacks=[cb]
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "stopped"
    assert steps[-1] == stop_step == 19
    assert artifacts.steps_completed == stop_step + 1
    assert "did not improve for 2 evals" in (artifacts.stop_reason or "")


@pytest.mark.anyio
async def test_in_the_loop_strict_fails_the_run(tmp_path: Path) -> None:
    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        return {"loss": 1.0}

    cb = EarlyStoppingCallback("accuracy", strict=True)
    loop = ev.TrainingLoop(
        step, num_steps=100, output_dir=tmp_path, evaluators=[Plateau()], callbacks=[cb]
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "failed"
    assert artifacts.steps_completed == 10  # the second eval is after step 9
    assert "never appeared" in (artifacts.stop_reason or "")


# -- a metric that never appears, baselines, resume keys --------------------------------------


def test_a_missing_metric_warns_after_the_first_eval_naming_what_arrived(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    cb = EarlyStoppingCallback("accuracy", eval_name="val")
    state = ev.LoopState()
    run(cb.on_train_start(state))
    for i in range(3):
        run(cb.on_eval(state, i * 10 + 9, "val", {"acc": 0.5, "loss": 1.0}))
    [record] = [r for r in warnings_log.records if "early_stopping" in r.getMessage()]
    message = record.getMessage()
    assert "metric 'accuracy' is not among the eval's metrics at step 10" in message
    assert "(metrics seen: acc, loss)" in message and "strict=True" in message
    assert not state.stop_requested  # a warning, not an error, unless strict


def test_a_baseline_never_beaten_says_so() -> None:
    state, stopped = feed(EarlyStoppingCallback("acc", patience=3, baseline=0.5), [0.3, 0.4, 0.2])
    assert stopped == 2
    assert state.stop_reason == "early_stopping: acc did not beat the baseline 0.5000 in 3 evals"


def test_state_key_is_the_class_and_its_identifying_params() -> None:
    a = EarlyStoppingCallback("acc", eval_name="val")
    b = EarlyStoppingCallback("loss", eval_name="val", mode="min")
    assert a.state_key == "EarlyStoppingCallback(metric='acc', eval_name='val', mode='max')"
    assert a.state_key != b.state_key
    assert EarlyStoppingCallback("acc", state_key="mine").state_key == "mine"
    (built,) = ev.build_callbacks(
        [{"kind": "early_stopping", "params": {"metric": "acc", "state_key": "k"}}]
    )
    assert built.state_key == "k"  # type: ignore[attr-defined]


class Partial:
    """An evaluator that never carries the watched metric, and runs often."""

    name, run_every = "fast", 2

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"latency": 1.0}


class Slow:
    """The evaluator that carries it, first after step 9."""

    name, run_every = "slow", 10

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"acc": 0.5}


@pytest.mark.anyio
async def test_strict_without_eval_name_waits_for_every_evaluator(tmp_path: Path) -> None:
    """Five evals of `fast` lack `acc` before `slow` runs once: not a reason to fail."""

    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        return {"loss": 1.0}

    cb = EarlyStoppingCallback("acc", strict=True, patience=100)
    loop = ev.TrainingLoop(
        step, num_steps=30, output_dir=tmp_path, evaluators=[Partial(), Slow()], callbacks=[cb]
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
        assert artifacts.status == "completed", artifacts.stop_reason
        assert cb.metric_seen
        # and when no evaluator carries it, strict fails once each has reported twice without it
        cb = EarlyStoppingCallback("accuracy", strict=True)
        loop = ev.TrainingLoop(
            step, num_steps=30, output_dir=tmp_path, evaluators=[Partial(), Slow()], callbacks=[cb]
        )
        artifacts = await loop.run()
    assert artifacts.status == "failed"
    assert artifacts.steps_completed == 20  # slow's second eval is after step 19
    assert "never appeared" in (artifacts.stop_reason or "")
    assert "fast: latency; slow: acc" in (artifacts.stop_reason or "")


@pytest.mark.anyio
async def test_resume_gives_each_early_stopping_its_own_state_even_reordered(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    class Evals:
        name, run_every = "val", 5

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            return {"acc": 0.5, "loss": 2.0}  # never improves after the first

    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        return {"loss": 1.0}

    def ckpt(state: ev.LoopState, name: str) -> None:
        return None

    acc = EarlyStoppingCallback("acc", patience=10)
    loss = EarlyStoppingCallback("loss", mode="min", patience=20)
    first = ev.TrainingLoop(
        step,
        num_steps=40,
        output_dir=tmp_path,
        run_key="r",
        evaluators=[Evals()],
        callbacks=[acc, loss],
        checkpoint=ckpt,
        save_every=20,
    )
    with anyio.fail_after(WAIT):
        await first.run(num_steps=20)  # evals after steps 4, 9, 14, 19: wait 3 for both
        assert (acc.wait, loss.wait) == (3, 3)
        acc2 = EarlyStoppingCallback("acc", patience=10)
        loss2 = EarlyStoppingCallback("loss", mode="min", patience=20)
        resumed = ev.TrainingLoop(
            step,
            num_steps=40,
            output_dir=tmp_path,
            run_key="r",
            evaluators=[Evals()],
            callbacks=[loss2, acc2],  # the other order
        )
        await resumed.run(start_step=20, num_steps=25)  # one more eval: after step 24
        assert (acc2.wait, loss2.wait) == (4, 4)
        assert acc2.best == 0.5 and loss2.best == 2.0  # each got its own state back
        assert not [
            r for r in warnings_log.records if "no callback of this run claims" in r.getMessage()
        ]
        # a saved state nobody claims is a warning; two callbacks with one key are refused
        orphan = ev.TrainingLoop(
            step,
            num_steps=40,
            output_dir=tmp_path,
            run_key="r",
            evaluators=[Evals()],
            callbacks=[EarlyStoppingCallback("acc", patience=10)],
        )
        await orphan.run(start_step=20, num_steps=21)
        [record] = [
            r for r in warnings_log.records if "no callback of this run claims" in r.getMessage()
        ]
        assert "EarlyStoppingCallback(metric='loss'" in record.getMessage()
        twins = ev.TrainingLoop(
            step,
            num_steps=40,
            output_dir=tmp_path,
            run_key="twins",
            callbacks=[EarlyStoppingCallback("acc"), EarlyStoppingCallback("acc")],
        )
        with pytest.raises(ValueError, match="give each a distinct `state_key`"):
            await twins.run()
