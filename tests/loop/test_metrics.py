"""Metrics as plain floats (``loop/_metrics.py``): numbers pass, sequences and
mappings of numbers flatten (``key/0``, ``key/a/b``), anything else is skipped
with one WARNING per key (``strict``: the step fails), and the events carry
exactly what the loggers write.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import evsys_async as ev
from evsys_async.callbacks import CsvMetricsCallback
from evsys_async.events import EvalEnded, EvalFailed
from evsys_async.loop._metrics import MetricReader
from tests.loop.devices import WAIT, step_of


def not_a_number_warnings(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if "not a number" in r.getMessage()]


def test_numbers_of_every_kind_become_floats_in_their_order() -> None:
    reader = MetricReader("step", strict=False)
    got = reader.read(
        {"f": 0.5, "i": 3, "b": True, "np": np.float32(0.25), "np0d": np.array(2.0), 7: 1.5},
        step_idx=0,
    )
    assert got == {"f": 0.5, "i": 3.0, "b": 1.0, "np": 0.25, "np0d": 2.0, "7": 1.5}
    assert list(got) == ["f", "i", "b", "np", "np0d", "7"]
    assert all(type(v) is float for v in got.values())
    with pytest.raises(TypeError, match="read-only"):
        got["f"] = 1.0  # type: ignore[index]  # it goes into an event as it is


def test_sequences_and_mappings_of_numbers_flatten() -> None:
    reader = MetricReader("step", strict=False)
    got = reader.read(
        {"acc": [0.5, 0.7], "loss": {"a": {"b": 1}, "c": (2, 3)}, "empty": []}, step_idx=0
    )
    assert got == {"acc/0": 0.5, "acc/1": 0.7, "loss/a/b": 1.0, "loss/c/0": 2.0, "loss/c/1": 3.0}


def test_a_non_number_is_skipped_with_one_warning_per_key(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    reader = MetricReader("step", strict=False)
    for step_idx in range(50):
        got = reader.read(
            {"loss": 1.0, "name": "run-a", "none": None, "mixed": [1.0, "x", object()],
             "numeric_text": "0.5", "many": np.zeros(3)},
            step_idx,
        )  # fmt: skip
        assert got == {"loss": 1.0, "mixed/0": 1.0}
    warned = not_a_number_warnings(warnings_log)
    assert len(warned) == 6  # once per key, not once per step
    for key, kind in [("name", "str"), ("none", "NoneType"), ("mixed/1", "str"),
                      ("mixed/2", "object"), ("numeric_text", "str"), ("many", "ndarray")]:  # fmt: skip
        assert sum(f"key={key} type={kind} step=0" in w for w in warned) == 1, (key, warned)


def test_cpu_tensors_become_floats_and_one_of_many_values_is_skipped(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    torch = pytest.importorskip("torch", reason="needs torch (the test-integrations extra)")
    reader = MetricReader("step", strict=False)  # made after torch was imported: short path
    loss = torch.tensor(0.25, requires_grad=True) * 2  # as a step returns it: no warning
    got = reader.read(
        {"loss": loss, "one": torch.tensor([3.0]), "n": torch.tensor(7), "many": torch.ones(3)},
        step_idx=0,
    )
    assert got == {"loss": 0.5, "one": 3.0, "n": 7.0}
    assert all(type(v) is float for v in got.values())
    assert len(not_a_number_warnings(warnings_log)) == 1
    with pytest.raises(TypeError, match=r"returned metric 'many' = .*not a number \(Tensor\)"):
        MetricReader("step", strict=True).read({"many": torch.ones(3)}, step_idx=0)


def test_under_strict_a_non_number_is_an_error_naming_it() -> None:
    reader = MetricReader("evaluator 'val'", strict=True)
    with pytest.raises(TypeError, match=r"evaluator 'val' returned metric 'acc/1' = 'x', which"):
        reader.read({"acc": [1.0, "x"]}, step_idx=3)
    with pytest.raises(TypeError, match="must return a mapping of metric name to number"):
        MetricReader("step", strict=False).read([1.0, 2.0], step_idx=0)


KINDS = pytest.mark.parametrize("kind", ["def", "async"])


class Steps(ev.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.evals: list[ev.Event] = []

    async def on_step_end(self, state: ev.LoopState, i: int, b: Any, metrics: Any) -> None:
        self.metrics.append(dict(metrics))

    async def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
        self.evals.append(event)

    async def on_eval(self, state: ev.LoopState, i: int, name: str, metrics: Any) -> None:
        self.evals.append(EvalEnded(step=i, eval_name=name, metrics=dict(metrics)))


class Mixed:
    name, run_every = "val", 2

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        return {"acc": 0.5, "per_class": [0.1, 0.9], "label": "cat"}


@pytest.mark.anyio
@KINDS
async def test_events_carry_what_the_loggers_write(
    kind: str, tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    def body(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        return {"loss": step_idx / 10, "phase": "warmup", "grad": {"norm": 2.0, "max": [1, 3]}}

    steps = Steps()
    loop = ev.TrainingLoop(
        step_of(kind, body), num_steps=10, output_dir=tmp_path, evaluators=[Mixed()],
        callbacks=[steps, CsvMetricsCallback("metrics.csv")],
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    flat = ["loss", "grad/norm", "grad/max/0", "grad/max/1"]
    assert [list(m) for m in steps.metrics] == [flat] * 10
    assert steps.metrics[3] == {"loss": 0.3, "grad/norm": 2.0, "grad/max/0": 1.0, "grad/max/1": 3.0}
    evals = [e for e in steps.evals if isinstance(e, EvalEnded)]
    assert [dict(e.metrics) for e in evals] == [
        {"acc": 0.5, "per_class/0": 0.1, "per_class/1": 0.9}
    ] * 5
    with (artifacts.run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert "phase" not in rows[0] and "label" not in rows[0]
    assert [float(r["grad/max/1"]) for r in rows if r["grad/max/1"]] == [3.0] * 10
    warned = not_a_number_warnings(warnings_log)
    assert len(warned) == 2  # one for the step's key, one for the evaluator's
    assert any("source=step key=phase type=str" in w for w in warned)
    assert any("source=evaluator 'val' key=label type=str" in w for w in warned)


@pytest.mark.anyio
@KINDS
async def test_under_strict_a_non_number_fails_the_step_and_the_eval(
    kind: str, tmp_path: Path
) -> None:
    def body(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        return {"loss": 1.0, "phase": "warmup"} if step_idx == 4 else {"loss": 1.0}

    steps = Steps()
    loop = ev.TrainingLoop(
        step_of(kind, body), num_steps=10, output_dir=tmp_path, evaluators=[Mixed()],
        callbacks=[steps], strict=True,
    )  # fmt: skip
    with anyio.fail_after(WAIT), pytest.raises(TypeError, match="'phase' = 'warmup'"):
        await loop.run()
    assert loop.artifacts is not None and loop.artifacts.status == "failed"
    assert len(steps.metrics) == 4
    failed = [e for e in steps.evals if isinstance(e, EvalFailed)]
    assert [e.step for e in failed] == [1, 3]
    assert "'label' = 'cat', which is not a number" in failed[0].error


def test_the_warning_goes_to_the_package_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="evsys_async")
    MetricReader("step", strict=False).read({"x": "y"}, step_idx=0)
    assert [(r.name, r.levelname) for r in caplog.records] == [("evsys_async", "WARNING")]
