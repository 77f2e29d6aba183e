"""Every built-in together in one real run, beside a failing and a blocking user callback.

The run stops early at exactly the original's eval; every file every built-in
writes is read back and agrees with what the loop published. The blocking
callback holds its first hook until the step function reaches step 100: the
run can only finish if the loop kept going while it blocked (counted, never
timed).
"""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks.csv_metrics import CsvMetricsCallback
from evsys_async.callbacks.debug_logger import DebugLoggerCallback
from evsys_async.callbacks.early_stopping import EarlyStoppingCallback
from evsys_async.callbacks.evsys_logger import EvsysLoggerCallback
from evsys_async.callbacks.local_logger import LocalLoggerCallback
from evsys_async.callbacks.mlflow_logger import MlflowLoggerCallback
from evsys_async.callbacks.print_progress import PrintProgressCallback
from evsys_async.callbacks.tensorboard_logger import TensorBoardLoggerCallback
from evsys_async.callbacks.wandb_logger import WandbLoggerCallback
from evsys_async.events import CallbackFailed, StepEnded, StopRequested, TrainEnded
from evsys_async.store import LocalStore
from evsys_async.transports import read_jsonl
from tests.callbacks.helpers import read_tfevents, wandb_history

pytestmark = pytest.mark.anyio

NUM_STEPS = 300
STOP_STEP = 159  # evals after steps 19, 39, ...; acc plateaus at step 99; patience 3
EVAL_STEPS = list(range(19, STOP_STEP + 1, 20))


class Failing(ev.Callback):
    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        raise ValueError(f"bad step {step_idx}")


class Blocking(ev.Callback):
    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.steps: list[int] = []

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        if step_idx == 0:
            assert self.release.wait(60), "the loop stalled behind a blocking callback"
        self.steps.append(step_idx)


class Plateau:
    name = "val"
    run_every = 20

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"acc": min(step_idx, 99) / 100}


def metrics_of(i: int) -> dict[str, float]:
    m = {"loss": 1.0 / (i + 1)}
    if i >= 50:
        m["lr"] = 1e-4 * (i - 49)  # a key that appears mid-run
    return m


@pytest.mark.slow
async def test_all_builtins_in_one_run(tmp_path: Path, wandb_env: Path) -> None:
    release = threading.Event()

    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        if i == 100:
            release.set()
        return metrics_of(i)

    progress = io.StringIO()
    blocking = Blocking(release)
    callbacks = [
        PrintProgressCallback(every=50, stream=progress),
        CsvMetricsCallback("metrics.csv"),
        EarlyStoppingCallback("acc", eval_name="val", patience=3),
        LocalLoggerCallback(print_every=0),
        DebugLoggerCallback(),
        TensorBoardLoggerCallback(),
        WandbLoggerCallback(project="all", mode="offline"),
        EvsysLoggerCallback(experiment="all"),
        MlflowLoggerCallback(),
        Failing(),
        blocking,
    ]
    loop = ev.TrainingLoop(
        step,
        num_steps=NUM_STEPS,
        output_dir=tmp_path,
        run_key="r1",
        evaluators=[Plateau()],
        callbacks=callbacks,
    )
    try:
        with anyio.fail_after(90):
            artifacts = await loop.run()
    finally:
        release.set()
    run_dir = tmp_path / "r1"
    steps = list(range(STOP_STEP + 1))

    # the run: stopped at the original's eval, every callback drained and closed
    assert artifacts.status == "stopped"
    assert artifacts.steps_completed == STOP_STEP + 1
    assert "acc did not improve for 3 evals" in (artifacts.stop_reason or "")
    report = artifacts.callback_report
    assert report is not None
    assert report["Failing"].failed == len(steps)
    assert blocking.steps == steps
    for name, health in report.items():
        assert health.pending == 0 and not health.stuck, (name, health)
        if name != "Failing":
            assert health.failed == 0, (name, health)

    # print_progress
    lines = progress.getvalue().splitlines()
    assert [
        x.split("]")[0] + "]" for x in lines if "eval" not in x and not x.startswith("stopped")
    ] == ["[1/300]", "[50/300]", "[100/300]", "[150/300]", "[160/300]"]  # first, every 50th, last
    assert sum("eval val: acc=" in x for x in lines) == len(EVAL_STEPS)
    assert lines[-1].startswith("stopped after 160 steps: early_stopping")

    # csv_metrics: one header over every key, one row per step plus one per eval
    rows = list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text(), newline="")))
    assert list(rows[0]) == ["step", "loss", "val/acc", "lr"]  # order of first appearance
    train = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in train] == steps
    assert all(float(r["loss"]) == metrics_of(int(r["step"]))["loss"] for r in train)
    assert [int(r["step"]) for r in rows if r["val/acc"]] == EVAL_STEPS

    # local_logger
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == steps
    assert [r["step"] for r in rows if r["split"] == "val"] == EVAL_STEPS
    envelopes = list(read_jsonl(run_dir / "events.jsonl"))
    kinds = [type(e.event) for e in envelopes]
    assert [e.event.step for e in envelopes if isinstance(e.event, StepEnded)] == steps
    assert kinds.count(StopRequested) == 1 and kinds.count(TrainEnded) == 1
    failed = [e.event for e in envelopes if isinstance(e.event, CallbackFailed)]
    # coalesced: the first failure, then sums (count); every failure accounted for
    assert sum(f.count for f in failed) == len(steps) and {f.subscriber for f in failed} == {
        "Failing"
    }
    seqs = [e.seq for e in envelopes]
    assert seqs == sorted(seqs)
    assert "- status: stopped" in (run_dir / "summary.md").read_text()

    # tensorboard_logger
    scalars = read_tfevents(run_dir / "tensorboard")
    assert [s for t, s, _ in scalars if t == "loss"] == steps
    assert [s for t, s, _ in scalars if t == "lr"] == steps[50:]
    assert [s for t, s, _ in scalars if t == "val/acc"] == EVAL_STEPS

    # wandb_logger (offline), read back from wandb's own log
    history = wandb_history(run_dir)
    assert [h["_step"] for h in history] == steps
    assert [h["_step"] for h in history if "val/acc" in h] == EVAL_STEPS
    assert "wandb_url" in loop.ctx.extras

    # mlflow, its SQLite store in the output dir, read back with MLflow's client
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tmp_path.name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == steps
    evals = client.get_metric_history(run.info.run_id, "val/acc")
    assert sorted(m.step for m in evals) == EVAL_STEPS

    # evsys_logger
    store = LocalStore(tmp_path / "store")
    eid = loop.ctx.ids["experiment_id"]
    run = store.read_run(eid, "r1")
    assert (
        run is not None and run["status"] == "stopped" and run["steps_completed"] == STOP_STEP + 1
    )
    assert [r["step"] for r in store.read_rows(eid, "r1", "metrics")] == steps
    assert [r["step"] for r in store.read_rows(eid, "r1", "evals")] == EVAL_STEPS


def test_every_original_name_is_registered() -> None:
    assert set(ev.list_callbacks()) >= {
        "print_progress",
        "csv_metrics",
        "early_stopping",
        "local_logger",
        "debug_logger",
        "tensorboard_logger",
        "wandb_logger",
        "evsys_logger",
        "mlflow",
    }


def test_builtins_import_no_bus_loop_or_sibling() -> None:
    """Imports point one way: a built-in imports only the utilities (``_util``), events,
    state, errors, policies (its class attribute), store, ``Callback`` and the registry,
    the built-ins' helpers (``_format``, ``_hparams``, ``_mlflow``, ``_tfevents``, ``_values``), the version, and a transport (``transports.jsonl``:
    the event log's header line) -- never the bus, the loop or another built-in."""
    import ast

    allowed_tops = {"_util", "_version", "events", "state", "errors", "policies", "store"}
    allowed = {"callbacks.base", "callbacks.registry"}
    allowed |= {
        f"callbacks.{m}"
        for m in (
            "_chart",
            "_format",
            "_hparams",
            "_mlflow",
            "_picture",
            "_tfevents",
            "_values",
            "_writer",
        )
    }
    allowed |= {"transports.jsonl"}
    pkg = Path(ev.__file__).parent / "callbacks"
    for name in (
        "print_progress",
        "csv_metrics",
        "early_stopping",
        "local_logger",
        "debug_logger",
        "tensorboard_logger",
        "wandb_logger",
        "evsys_logger",
        "mlflow_logger",
    ):
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = ["callbacks"][: 2 - node.level]
                target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
                ok = target.split(".")[0] in allowed_tops or target in allowed
                assert ok, (name, node.module)


async def test_the_docs_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = Path(__file__).parents[2] / "docs" / "callbacks.md"
    text = docs.read_text(encoding="utf-8").split("## An example that runs")[1]
    code = text.split("```python")[1].split("```")[0]
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(code, str(docs), "exec"), namespace)
    with anyio.fail_after(60):
        artifacts = await namespace["main"](str(tmp_path / "example"))
    assert (artifacts.status, artifacts.steps_completed) == ("stopped", 160)
    assert capsys.readouterr().out.splitlines()[-1].startswith("stopped 160 early_stopping")
    for name in ("metrics.csv", "metrics.jsonl", "events.jsonl", "summary.md"):
        assert (tmp_path / "example" / "demo" / name).stat().st_size > 0
