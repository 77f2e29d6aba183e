"""What a run writes itself (``loop/_runfiles.py``): its hyperparameters in
``TrainStarted.config`` and ``hparams.yaml``, credentials masked everywhere; its
``manifest.json`` with rank, start step, evals and degraded callbacks, written atomically,
and a manifest that cannot be written recorded, not raised.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

import evsys_async as ev
from evsys_async.config import build_loop, load_config
from evsys_async.events import Event, TrainStarted
from evsys_async.state import EvalTally
from tests.loop.helpers import WAIT, Acc, loss_step

pytestmark = pytest.mark.anyio


class Started:
    def __init__(self) -> None:
        self.configs: list[dict[str, Any]] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, TrainStarted):
            self.configs.append(json.loads(json.dumps(event.config)))


async def test_hyperparameters_travel_with_the_run(tmp_path: Path) -> None:
    config = {"lr": 0.1, "batch_size": 64, "schedule": {"warmup": [1, 2]}, "path": tmp_path}
    read: list[dict[str, Any]] = []

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        read.append(state.ctx.run_config)
        return {"loss": 1.0}

    started = Started()
    loop = ev.TrainingLoop(
        step, num_steps=2, output_dir=tmp_path, run_key="h", config=config, subscribers=[started]
    )
    with anyio.fail_after(WAIT):
        await loop.run()
    recorded = {"lr": 0.1, "batch_size": 64, "schedule": {"warmup": [1, 2]}, "path": str(tmp_path)}
    assert started.configs == [recorded]
    assert yaml.safe_load((tmp_path / "h" / "hparams.yaml").read_text()) == recorded
    assert read[0] is loop.ctx.run_config and read[0]["path"] == tmp_path  # as given


async def test_a_config_files_params_and_specs_are_the_runs_hyperparameters(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            name: cfg
            num_steps: 3
            output_dir: {tmp_path / "runs"}
            step: demo
            seed: 7
            params: {{lr: 0.5, delay: 0.0}}
            callbacks:
              - {{kind: csv_metrics, params: {{out_path: m.csv}}}}
            """
        )
    )
    loop = build_loop(load_config(path))
    started = Started()
    loop.subscribe(started)
    with anyio.fail_after(WAIT):
        await loop.run()
    hparams = yaml.safe_load((tmp_path / "runs" / "cfg" / "hparams.yaml").read_text())
    assert started.configs == [hparams]
    assert {"lr": 0.5, "delay": 0.0, "seed": 7, "step": "demo"}.items() <= hparams.items()
    assert [(c["kind"], c["params"]) for c in hparams["callbacks"]] == [
        ("csv_metrics", {"out_path": "m.csv"})
    ]


async def test_a_planted_secret_reaches_no_file_the_run_writes(tmp_path: Path) -> None:
    secrets = ["s3cr3t-api-k3y", "pw-in-an-url", "b3arer-t0ken", "hf_tok3n_value"]
    config = {
        "lr": 0.1,
        "api_key": secrets[0],
        "db": f"redis://:{secrets[1]}@127.0.0.1:6379/0",
        "client": {"headers": {"Authorization": f"Bearer {secrets[2]}"}},
        "hf_token": secrets[3],
    }
    seen: list[str] = []

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        seen.append(state.ctx.run_config["api_key"])  # the step still reads the real one
        return {"loss": 1.0}

    def checkpoint(state: ev.LoopState, name: str) -> dict[str, Any]:
        return {"path": None}

    callbacks = ev.build_callbacks(
        [
            {"kind": "csv_metrics", "params": {"out_path": "m.csv"}},
            {"kind": "local_logger", "params": {"print_every": 0}},
        ]
    )
    loop = ev.TrainingLoop(
        step, num_steps=4, output_dir=tmp_path, run_key="s", config=config,
        callbacks=callbacks, checkpoint=checkpoint, save_every=2,
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        await loop.run()
    assert seen == [secrets[0]] * 4
    written = _files(tmp_path)
    assert {"hparams.yaml", "manifest.json", "events.jsonl", "m.csv"} <= {p.name for p in written}
    for p, data in written.items():
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} in {p}"
    hparams = yaml.safe_load((tmp_path / "s" / "hparams.yaml").read_text())
    assert hparams["api_key"] == "***" and hparams["db"] == "redis://:***@127.0.0.1:6379/0"
    assert hparams["client"] == {"headers": {"Authorization": "***"}} and hparams["lr"] == 0.1


def _files(root: Path) -> dict[Path, bytes]:
    """Every file under ``root``, read whole."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def test_the_manifest_says_rank_start_step_evals_and_degraded_callbacks(
    tmp_path: Path,
) -> None:
    class Lossy(ev.Callback):
        def on_step_end(self, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            if i == 5:
                self.degraded = ev.Degraded("disk full", rows_lost=3, missing_from_step=5)
                # the evaluators' tallies are the evals phase's to fill: stand in for it
                assert loop.artifacts is not None
                loop.artifacts.evals["val"] = EvalTally(runs=2, failed=1, first_error="x")

    loop = ev.TrainingLoop(
        loss_step, num_steps=10, output_dir=tmp_path, run_key="m", callbacks=[Lossy()],
        evaluators=[Acc()],
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "completed"  # training completed: degraded is not failed
    health = artifacts.callback_report["Lossy"]
    assert health.degraded == ev.Degraded("disk full", rows_lost=3, missing_from_step=5)
    assert not health.ok
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert (manifest["rank"], manifest["world_size"], manifest["start_step"]) == (0, 1, 0)
    assert manifest["degraded"] == [
        {"callback": "Lossy", "reason": "disk full", "rows_lost": 3, "missing_from_step": 5}
    ]
    assert manifest["evals"] == {"val": {"runs": 2, "failed": 1, "first_error": "x"}}
    assert manifest["callback_report"]["Lossy"]["degraded"]["reason"] == "disk full"


async def test_a_manifest_that_cannot_be_written_is_recorded_not_raised(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 0:  # the manifest's place is taken: os.replace cannot put it there
            (state.run_dir / "manifest.json" / "x").mkdir(parents=True)
        if step_idx == 2:
            raise ValueError("nan loss")  # so error.txt is written too (it can be)
        return {"loss": 1.0}

    loop = ev.TrainingLoop(step, num_steps=5, output_dir=tmp_path, run_key="e")
    with anyio.fail_after(WAIT), pytest.raises(ValueError, match="nan loss"):
        await loop.run()
    artifacts = loop.artifacts
    assert artifacts is not None and artifacts.status == "failed"
    assert artifacts.manifest_error is not None and "manifest.json" in artifacts.manifest_error
    assert "nan loss" in (tmp_path / "e" / "error.txt").read_text()
    assert any("could not be written" in r.getMessage() for r in warnings_log.records)
    assert not [p for p in os.listdir(tmp_path / "e") if p.endswith(".tmp")]  # no debris
