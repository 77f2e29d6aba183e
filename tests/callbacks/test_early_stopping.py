"""early_stopping: stops at exactly the eval the seed stops at; NaN, strict, resume, subclassing."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import evsys_async as ev
from evsys_async.callbacks.early_stopping import EarlyStoppingCallback


def seed_stop_index(
    values: Sequence[float], patience: int, mode: str, min_delta: float
) -> int | None:
    """The seed's EarlyStoppingCallback.on_eval, verbatim in effect: the index of the
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
def test_stops_at_the_same_eval_as_the_seed(
    values: list[float], patience: int, mode: str, min_delta: float
) -> None:
    cb = EarlyStoppingCallback("acc", patience=patience, mode=mode, min_delta=min_delta)  # type: ignore[arg-type]
    _, stopped = feed(cb, values)
    assert stopped == seed_stop_index(values, patience, mode, min_delta)


def test_reason_and_plateau() -> None:
    cb = EarlyStoppingCallback("acc", patience=2)
    state, stopped = feed(cb, [0.1, 0.5, 0.5, 0.4, 0.9])
    assert stopped == 3
    assert state.stop_reason is not None and "acc did not improve for 2 evals" in state.stop_reason
    assert "best 0.5 at step 1" in state.stop_reason
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
    assert stopped == seed_stop_index([1.0, bad, bad], 2, "min", 0.0)  # off: the seed's rule


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


# -- in the loop: the stop lands before the next step, as in the synchronous seed -------


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
    k = seed_stop_index(values, 2, "max", 0.0)
    assert k is not None
    stop_step = 4 + 5 * k  # evals after steps 4, 9, 14, ...: the seed stops after step 19
    cb = EarlyStoppingCallback("acc", patience=2)
    loop = ev.TrainingLoop(
        step, num_steps=100, output_dir=tmp_path, evaluators=[Plateau()], callbacks=[cb]
    )
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
    artifacts = await loop.run()
    assert artifacts.status == "failed"
    assert artifacts.steps_completed == 10  # the second eval is after step 9
    assert "never appeared" in (artifacts.stop_reason or "")
