"""The evaluator registry: kinds from configs, the callback registry's errors, entry points."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from test_registry import write_plugin

import evsys_async as ev
from evsys_async.evaluators import (
    EVALUATORS,
    Evaluator,
    build_evaluators,
    get_evaluator,
    list_evaluators,
    register_evaluator,
)


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
