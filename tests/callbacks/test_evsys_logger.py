"""evsys_logger and the local experiment store: the original system's layout, read back."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks.evsys_logger import EvsysLoggerCallback
from evsys_async.events import CheckpointSaved
from evsys_async.store import LocalStore
from tests.callbacks.helpers import WAIT, drive, make_state, run_events


@pytest.mark.anyio
async def test_standalone_run_writes_its_records(tmp_path: Path) -> None:
    cb = EvsysLoggerCallback(experiment="solo")
    state = make_state(tmp_path, num_steps=4)
    events = run_events(4, evals={1: {"acc": 0.5}})
    events.insert(
        -1, CheckpointSaved(step=3, name="final", path="p", row={"name": "final", "step": 3})
    )
    with anyio.fail_after(WAIT):
        await drive(cb, state, events)
    eid = state.ctx.ids["experiment_id"]
    assert state.ctx.ids["run_id"] == f"{eid}/r1"
    assert isinstance(state.ctx.store, LocalStore)
    store = LocalStore(tmp_path / "store")
    run = store.read_run(eid, "r1")
    assert run is not None and run["status"] == "completed" and run["steps_completed"] == 4
    assert [r["step"] for r in store.read_rows(eid, "r1", "metrics")] == [0, 1, 2, 3]
    assert [(r["name"], r["step"], r["metrics"]) for r in store.read_rows(eid, "r1", "evals")] == [
        ("val", 1, {"acc": 0.5})
    ]
    assert store.read_rows(eid, "r1", "checkpoints") == [{"name": "final", "step": 3}]
    assert store.read_experiment(eid)["name"] == "solo"  # type: ignore[index]


@pytest.mark.anyio
async def test_experiment_records_every_arm(tmp_path: Path) -> None:
    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        return {"loss": state.ctx.run_config["lr"] * i}

    class Acc:
        name = "val"
        run_every = 2

        async def evaluate(self, state: ev.LoopState, i: int) -> dict[str, float]:
            return {"acc": state.ctx.run_config["lr"]}

    cb = EvsysLoggerCallback()
    exp = ev.Experiment(
        "exp",
        [ev.Arm("a", step, {"lr": 0.1}), ev.Arm("b", step, {"lr": 0.2})],
        num_steps=4,
        output_dir=tmp_path,
        callbacks=[cb],
        evaluators=[Acc()],
        success_metric="val/acc",
    )
    with anyio.fail_after(WAIT):
        result = await exp.run()
    assert result.best_arm == "b"
    store = LocalStore(tmp_path / "exp" / "store")
    eid = exp.ctx.ids["experiment_id"]
    record = store.read_experiment(eid)
    assert (
        record is not None
        and record["status"] == "completed"
        and record["result"]["best_arm"] == "b"
    )
    for arm in ("a", "b"):
        run = store.read_run(eid, arm)
        assert run is not None and run["status"] == "completed" and run["group"] == arm
        assert run["run_config"]["arm"] == arm
        assert len(store.read_rows(eid, arm, "metrics")) == 4
        assert len(store.read_rows(eid, arm, "evals")) == 2


@pytest.mark.anyio
async def test_benchmark_predictions_through_dispatch(tmp_path: Path) -> None:
    cb = EvsysLoggerCallback(store_dir=tmp_path / "s")
    ctx = ev.LogContext(output_dir=tmp_path, run_key="r")
    with anyio.fail_after(WAIT):
        await ev.dispatch([cb], "on_experiment_start", ctx)
        await ev.dispatch(
            [cb],
            "on_benchmark_eval",
            ctx,
            {"name": "m", "metrics": {"acc": 1.0}},
            [{"id": 1}, "x"],
            step=2,
        )
    store = LocalStore(tmp_path / "s")
    eid = ctx.ids["experiment_id"]
    assert store.read_rows(eid, "r", "predictions") == [
        {"benchmark": "m", "step": 2, "id": 1},
        {"benchmark": "m", "step": 2, "prediction": "x"},
    ]
    assert store.read_rows(eid, "r", "evals")[0]["metrics"] == {"acc": 1.0}


@pytest.mark.anyio
async def test_disables_itself_once_when_the_experiment_owns_the_store(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    cb = EvsysLoggerCallback()
    state = make_state(tmp_path, num_steps=3)
    state.ctx.store = LocalStore(tmp_path / "owned", owned_by_experiment=True)
    with anyio.fail_after(WAIT):
        await ev.dispatch([cb], "on_experiment_start", state.ctx)
        await drive(cb, state, run_events(3))
    warnings = [r for r in warnings_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the experiment owns the store" in warnings[0].getMessage()
    assert not (tmp_path / "owned").exists() and not (tmp_path / "store").exists()


def test_config() -> None:
    (cb,) = ev.build_callbacks(
        [{"kind": "evsys_logger", "params": {"store_dir": "/tmp/s", "experiment": "e"}}]
    )
    assert isinstance(cb, EvsysLoggerCallback) and cb.experiment == "e"


def test_store_rows_keep_nan_and_inf_as_metrics_jsonl_does(tmp_path: Path) -> None:
    import math

    store = LocalStore(tmp_path)
    store.append(
        "e", "r", "metrics", [{"step": 0, "loss": math.nan, "g": math.inf, "h": -math.inf}]
    )
    row = json.loads((store.run_dir("e", "r") / "metrics.jsonl").read_text())
    assert row == {"step": 0, "loss": "nan", "g": "inf", "h": "-inf"}
