"""Checkpoints with resume (``loop/_checkpoints.py``): each save's row and event; the
callbacks' state asked for in their own thread, saved, and restored on a resume; a resumed
run writes each step once.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from tests.loop.helpers import WAIT, Acc, Recorder, loss_step

pytestmark = pytest.mark.anyio


async def test_checkpoints_rows_and_events(tmp_path: Path) -> None:
    saved: list[tuple[int, str]] = []

    def checkpoint(state: ev.LoopState, name: str) -> str:
        saved.append((state.step, name))
        path = state.run_dir / f"{name}.ckpt"
        path.write_text("weights")
        return str(path)

    rec = Recorder()
    loop = ev.TrainingLoop(
        loss_step,
        num_steps=10,
        output_dir=tmp_path,
        run_key="ck",
        save_every=4,
        checkpoint=checkpoint,
        callbacks=[rec],
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert [n for _, n in saved] == ["step_4", "step_8", "final"]
    rows = [
        json.loads(line)
        for line in (tmp_path / "ck" / "checkpoints.jsonl").read_text().splitlines()
    ]
    assert [r["name"] for r in rows] == ["step_4", "step_8", "final"]
    assert rows[0]["path"].endswith("step_4.ckpt")
    assert [r["name"] for r in artifacts.checkpoints] == ["step_4", "step_8", "final"]
    assert [v for k, v in rec.calls if k == "ckpt"] == ["step_4", "step_8", "final"]


async def test_resume_restores_callback_state(tmp_path: Path) -> None:
    class Counter(ev.Callback):
        def __init__(self) -> None:
            self.count = 0

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            self.count += 1

        def state_dict(self) -> dict[str, int]:
            return {"count": self.count}

        def load_state_dict(self, d: dict[str, int]) -> None:
            self.count = d["count"]

    def checkpoint(state: ev.LoopState, name: str) -> None:
        return None

    first = Counter()
    loop = ev.TrainingLoop(
        loss_step, num_steps=6, output_dir=tmp_path, checkpoint=checkpoint, save_every=3,
        callbacks=[first],
    )  # fmt: skip
    with anyio.fail_after(30):
        await loop.run()
    assert first.count == 6
    second = Counter()
    loop2 = ev.TrainingLoop(
        loss_step, num_steps=10, output_dir=tmp_path, checkpoint=checkpoint, callbacks=[second]
    )
    with anyio.fail_after(30):
        await loop2.run(start_step=6)
    assert second.count == 6 + 4


async def test_state_dict_runs_in_the_callbacks_own_thread(tmp_path: Path) -> None:
    """A callback tied to its thread (sqlite3, a GUI) is asked for its state there."""
    threads: dict[str, set[int]] = {"hook": set(), "state_dict": set()}

    class Stateful(ev.Callback):
        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            threads["hook"].add(threading.get_ident())

        def state_dict(self) -> dict[str, int]:
            threads["state_dict"].add(threading.get_ident())
            return {"n": 1}

    loop = ev.TrainingLoop(
        loss_step,
        num_steps=4,
        output_dir=tmp_path,
        callbacks=[Stateful()],
        checkpoint=lambda state, name: None,
        save_every=2,
    )
    with anyio.fail_after(30):
        await loop.run()
    assert len(threads["hook"]) == 1
    assert threads["state_dict"] == threads["hook"]
    saved = json.loads((tmp_path / "run" / "callbacks_state.json").read_text())  # no key: "run"
    assert saved == {"Stateful": {"n": 1}}


async def test_resume_writes_each_step_once(tmp_path: Path) -> None:
    """25 steps, then a resume from step 20 to 30: rows 20-24 are not duplicated."""

    def checkpoint(state: ev.LoopState, name: str) -> None:
        return None

    def loop() -> ev.TrainingLoop:
        return ev.TrainingLoop(
            loss_step,
            num_steps=30,
            output_dir=tmp_path,
            run_key="r",
            evaluators=[Acc()],
            callbacks=ev.build_callbacks(
                [
                    {"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}},
                    {"kind": "local_logger", "params": {"print_every": 0}},
                ]
            ),
            checkpoint=checkpoint,
            save_every=10,
        )

    with anyio.fail_after(WAIT):
        await loop().run(num_steps=25)
        resumed = loop()
        await resumed.run(start_step=20)
    assert resumed.run_key == "r"  # a resume reuses its dir
    run_dir = tmp_path / "r"
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))
    train = [int(r["step"]) for r in rows if r["loss"]]
    assert train == list(range(30))
    assert [int(r["step"]) for r in rows if r["val/acc"]] == [4, 9, 14, 19, 24, 29]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == list(range(30))
    assert [x["step"] for x in lines if x["split"] == "val"] == [4, 9, 14, 19, 24, 29]
    checkpoints = [json.loads(x) for x in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert [(c["name"], c["step"]) for c in checkpoints] == [
        ("step_10", 9),
        ("step_20", 19),
        ("step_30", 29),  # one save per step: no "final" again after step_30
    ]


@pytest.mark.parametrize(("num_steps", "names"), [
    (10, ["step_5", "step_10"]),  # the cadence saved after the last step: once
    (12, ["step_5", "step_10", "final"]),  # it did not: the shutdown saves "final"
])  # fmt: skip
async def test_one_save_per_step(tmp_path: Path, num_steps: int, names: list[str]) -> None:
    saved: list[tuple[int, str]] = []

    def checkpoint(state: ev.LoopState, name: str) -> None:
        saved.append((state.step, name))

    loop = ev.TrainingLoop(
        loss_step, num_steps=num_steps, output_dir=tmp_path, run_key="o",
        save_every=5, checkpoint=checkpoint,
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    rows = [json.loads(x) for x in (tmp_path / "o" / "checkpoints.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [n for _, n in saved] == names
    steps = [r["step"] for r in rows]
    assert len(set(steps)) == len(steps) and steps[-1] == num_steps - 1  # one row a step
    assert [r["name"] for r in artifacts.checkpoints] == names
