"""The evaluator registry: kinds from configs, the callback registry's errors, entry points."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import evsys_async as ev
from evsys_async.evaluators import (
    EVALUATORS,
    Evaluator,
    build_evaluators,
    get_evaluator,
    list_evaluators,
    register_evaluator,
)
from tests.callbacks.test_registry import write_plugin


@register_evaluator("test_constant")
class Constant:
    """Reports the same score every time."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        value: float = 1.0
        run_every: int = 1
        name: str = "const"

    def __init__(self, value: float = 1.0, run_every: int = 1, name: str = "const") -> None:
        self.value, self.run_every, self.name = value, run_every, name

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> Mapping[str, float]:
        await anyio.lowlevel.checkpoint()
        return {"score": self.value}


def test_build_from_specs_gives_protocol_instances() -> None:
    (built,) = build_evaluators([{"kind": "test_constant", "params": {"value": 2.5, "name": "v"}}])
    assert isinstance(built, Evaluator)
    assert (built.name, built.run_every) == ("v", 1)
    assert Constant.kind == "test_constant"  # type: ignore[attr-defined]


def test_errors_name_place_and_close_name() -> None:
    with pytest.raises(ev.ConfigError) as info:
        build_evaluators([{"kind": "test_constant", "params": {"valeu": 2}}])
    assert str(info.value).startswith(
        "evaluators[0].params.valeu (test_constant): unknown field 'valeu'"
    )
    assert "did you mean 'value'?" in str(info.value)
    with pytest.raises(
        ev.ConfigError,
        match=r"evaluators\[0\]\.kind: no evaluator kind 'test_constnt' — did you mean 'test_constant'\?",
    ):
        build_evaluators([{"kind": "test_constnt"}])
    with pytest.raises(
        ev.ConfigError, match=r"evaluators\[0\]\.params\.value .*expected float, got str 'high'"
    ):
        build_evaluators([{"kind": "test_constant", "params": {"value": "high"}}])


def test_registration_rules() -> None:
    with pytest.raises(TypeError, match="evaluate"):
        register_evaluator("test_no_evaluate")(int)

    class Other:
        async def evaluate(self, state: Any, step_idx: int) -> dict[str, float]:
            return {}

    with pytest.raises(ev.ConfigError, match="already registered"):
        register_evaluator("test_constant")(Other)
    register_evaluator("test_constant")(Constant)  # the same class again is fine


def test_built_object_without_the_protocol_is_a_config_error() -> None:
    @register_evaluator("test_lacks_run_every", replace=True)
    class Lacks:
        def __init__(self) -> None:
            self.name = "x"

        async def evaluate(self, state: Any, step_idx: int) -> dict[str, float]:
            return {}

    del Lacks.name  # type: ignore[attr-defined]
    with pytest.raises(
        ev.ConfigError, match=r"evaluators\[0\] \(test_lacks_run_every\): Lacks lacks run_every"
    ):
        build_evaluators([{"kind": "test_lacks_run_every"}])


def test_demo_evaluator_is_a_lazy_builtin() -> None:
    assert "demo_accuracy" in EVALUATORS.known()
    cls = get_evaluator("demo_accuracy")
    assert cls.__module__ == "evsys_async.demo"
    assert "demo_accuracy" in list_evaluators()


def test_entry_point_evaluator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    EVALUATORS.refresh()
    try:
        (built,) = build_evaluators([{"kind": "plugin_eval", "params": {"run_every": 3}}])
        assert built.name == "plugin" and built.run_every == 3
    finally:
        EVALUATORS.refresh()


@pytest.mark.anyio
async def test_built_evaluators_run_in_the_loop(tmp_path: Path) -> None:
    evaluators = build_evaluators(
        [
            {"kind": "test_constant", "params": {"value": 0.75, "run_every": 2, "name": "a"}},
            {"kind": "demo_accuracy", "params": {"run_every": 4}},
        ]
    )
    seen: list[tuple[int, str, dict[str, float]]] = []

    class Record(ev.Callback):
        async def on_eval(self, state: Any, step_idx: int, eval_name: str, metrics: Any) -> None:
            seen.append((step_idx, eval_name, dict(metrics)))

    from evsys_async.demo import train_step

    loop = ev.TrainingLoop(
        train_step, num_steps=4, output_dir=tmp_path, evaluators=evaluators, callbacks=[Record()]
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert [(s, n) for s, n, _ in seen] == [(1, "a"), (3, "a"), (3, "val")]
    assert seen[0][2] == {"score": 0.75}
    assert 0.0 <= seen[2][2]["pass_rate"] <= 1.0 and seen[2][2]["loss"] > 0


# -- lifecycle: setup at run start, aclose in the shutdown after in-flight evals -----------


class Lifecycle:
    """Logs setup, evaluate and aclose; ``gate`` holds each evaluate until set."""

    def __init__(self, log: list[str], *, name: str = "life", run_every: int = 1) -> None:
        self.name, self.run_every, self.log = name, run_every, log
        self.gate: anyio.Event | None = None
        self.state: ev.LoopState | None = None

    async def setup(self, state: ev.LoopState) -> None:
        self.state = state
        self.log.append("setup")

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> Mapping[str, float]:
        self.log.append(f"eval {step_idx}")
        if self.gate is not None:
            await self.gate.wait()
        self.log.append(f"eval {step_idx} done")
        return {"x": float(step_idx)}

    async def aclose(self) -> None:
        self.log.append("aclose")


class StepLog(ev.Callback):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def on_train_start(self, state: ev.LoopState) -> None:
        self.log.append("train start")


@pytest.mark.anyio
async def test_setup_runs_before_the_first_step_and_aclose_after_the_last_eval(
    tmp_path: Path,
) -> None:
    log: list[str] = []
    life = Lifecycle(log, run_every=2)

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        log.append(f"step {step_idx}")
        return {}

    loop = ev.TrainingLoop(step, num_steps=4, output_dir=tmp_path, evaluators=[life])
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert log == [
        "setup", "step 0", "step 1", "eval 1", "eval 1 done",
        "step 2", "step 3", "eval 3", "eval 3 done", "aclose",
    ]  # fmt: skip
    assert life.state is loop.state


@pytest.mark.anyio
async def test_aclose_waits_for_background_evals_in_flight(tmp_path: Path) -> None:
    log: list[str] = []
    life = Lifecycle(log, run_every=2)
    life.gate = anyio.Event()
    gate = life.gate

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 3:  # the eval of step 1 is in flight: let it finish later
            gate.set()
        return {}

    loop = ev.TrainingLoop(
        step, num_steps=4, output_dir=tmp_path, evaluators=[life], eval_mode="background"
    )
    with anyio.fail_after(30):
        await loop.run()
    assert log[0] == "setup" and log[-1] == "aclose"
    assert log.index("aclose") > log.index("eval 3 done") > log.index("eval 1 done")


@pytest.mark.anyio
async def test_aclose_runs_when_the_run_is_cancelled_and_when_a_step_fails(
    tmp_path: Path,
) -> None:
    log: list[str] = []
    started = anyio.Event()

    async def hang(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        started.set()
        await anyio.sleep_forever()
        return {}

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            loop = ev.TrainingLoop(
                hang, num_steps=3, output_dir=tmp_path / "a", evaluators=[Lifecycle(log)]
            )
            tg.start_soon(loop.run)
            await started.wait()
            tg.cancel_scope.cancel()
    assert log == ["setup", "aclose"]
    assert loop.artifacts is not None and loop.artifacts.status == "cancelled"

    log.clear()

    async def boom(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        raise RuntimeError("nan loss")

    loop = ev.TrainingLoop(
        boom, num_steps=3, output_dir=tmp_path / "b", evaluators=[Lifecycle(log)]
    )
    with anyio.fail_after(30), pytest.raises(RuntimeError, match="nan loss"):
        await loop.run()
    assert log == ["setup", "aclose"]


@pytest.mark.anyio
async def test_failing_setup_and_aclose_are_logged_and_training_goes_on(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    class Broken:
        name, run_every = "broken", 1

        async def setup(self, state: ev.LoopState) -> None:
            raise ConnectionError("eval server unreachable")

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> Mapping[str, float]:
            raise RuntimeError("not set up")

        async def aclose(self) -> None:
            raise OSError("close failed")

    seen: list[str] = []

    class Failures(ev.Callback):
        async def on_event(self, state: ev.LoopState, event: Any) -> None:
            if isinstance(event, ev.events.EvalFailed):
                seen.append(event.error)

    loop = ev.TrainingLoop(
        loss_step, num_steps=2, output_dir=tmp_path, evaluators=[Broken()], callbacks=[Failures()]
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert (artifacts.status, artifacts.steps_completed) == ("completed", 2)
    assert seen == ["RuntimeError: not set up"] * 2
    text = warnings_log.text
    assert "evaluator setup failed; its evals will fail, training goes on" in text
    assert "evaluator=broken" in text and "ConnectionError: eval server unreachable" in text
    assert "evaluator aclose failed" in text and "OSError: close failed" in text


@pytest.mark.anyio
async def test_a_hung_aclose_is_cut_short_by_the_shutdown_deadline(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    class Hangs:
        name, run_every = "hangs", 0

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> Mapping[str, float]:
            return {}

        async def aclose(self) -> None:
            await anyio.sleep_forever()

    loop = ev.TrainingLoop(
        loss_step, num_steps=2, output_dir=tmp_path, evaluators=[Hangs()], drain_timeout=0.5
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert "evaluators still closing at the shutdown deadline" in warnings_log.text
    assert (artifacts.run_dir / "manifest.json").exists()


async def loss_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    return {"loss": 1.0 / (step_idx + 1)}
