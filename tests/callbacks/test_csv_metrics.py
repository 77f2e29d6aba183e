"""csv_metrics: one header covering every key (even keys that appear mid-run), full
precision, a file the csv module reads whole after every batch."""

from __future__ import annotations

import csv
from pathlib import Path

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks.csv_metrics import CsvMetricsCallback
from evsys_async.events import EvalEnded, Event, StepEnded, TrainEnded, TrainStarted
from tests.callbacks.helpers import WAIT, drive, make_state, run_events

pytestmark = pytest.mark.anyio


def read(path: Path, delimiter: str = ",") -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    header, body = rows[0], rows[1:]
    assert all(len(r) == len(header) for r in body), (
        rows
    )  # every line whole and as wide as the header
    return header, [dict(zip(header, r, strict=True)) for r in body]


def mid_run_events() -> list[Event]:
    return [
        TrainStarted(num_steps=5),
        StepEnded(step=0, num_steps=5, metrics={"loss": 1 / 3}),
        StepEnded(step=1, num_steps=5, metrics={"loss": 0.1}),
        StepEnded(step=2, num_steps=5, metrics={"loss": 0.2, "lr": 1e-7}),
        EvalEnded(step=2, eval_name="val", metrics={"acc": 2 / 3}),
        StepEnded(step=3, num_steps=5, metrics={"grad_norm": 12345.678901234567}),
        StepEnded(step=4, num_steps=5, metrics={"loss": 0.05, "lr": 1e-8}),
        TrainEnded(status="completed", steps_completed=5, num_steps=5),
    ]


async def test_keys_appearing_mid_run_widen_the_header(tmp_path: Path) -> None:
    cb = CsvMetricsCallback("metrics.csv")
    state = make_state(tmp_path, num_steps=5)
    with anyio.fail_after(WAIT):
        await drive(cb, state, mid_run_events())
    header, rows = read(state.run_dir / "metrics.csv")
    assert header == ["step", "loss", "lr", "val/acc", "grad_norm"]
    assert [r["step"] for r in rows] == ["0", "1", "2", "2", "3", "4"]
    assert float(rows[0]["loss"]) == 1 / 3  # full precision: the float round-trips
    assert rows[0]["lr"] == ""
    assert float(rows[2]["lr"]) == 1e-7
    assert rows[3]["loss"] == "" and float(rows[3]["val/acc"]) == 2 / 3
    assert float(rows[4]["grad_norm"]) == 12345.678901234567
    assert not list(state.run_dir.glob(".*.tmp"))  # the rewrite left nothing behind


async def test_file_is_valid_after_every_event(tmp_path: Path) -> None:
    """publish_and_wait returns after the batch's flush(): read the file at each point."""
    cb = CsvMetricsCallback(tmp_path / "out" / "m.csv", delimiter=";")
    state = make_state(tmp_path, num_steps=5)
    seen: list[int] = []

    def check(event: Event) -> None:
        if not isinstance(event, StepEnded | EvalEnded):
            return  # not this callback's events: publish_and_wait does not wait for it
        header, rows = read(tmp_path / "out" / "m.csv", ";")
        assert header[0] == "step"
        if isinstance(event, StepEnded):
            seen.append(event.step)
            assert [
                int(r["step"])
                for r in rows
                if any(r[k] for k in header if not k.startswith("val/") and k != "step")
            ] == seen
            assert set(event.metrics) <= set(header)

    with anyio.fail_after(WAIT):
        await drive(cb, state, mid_run_events(), wait_each=True, after_each=check)
    assert seen == [0, 1, 2, 3, 4]


async def test_resume_appends_under_the_same_header(tmp_path: Path) -> None:
    state = make_state(tmp_path, num_steps=6)
    with anyio.fail_after(WAIT):
        await drive(
            CsvMetricsCallback("m.csv"), state, run_events(3, lambda i: {"loss": float(i)})[:-1]
        )
        resumed = make_state(tmp_path, num_steps=6, step=3, start_step=3)
        events = [
            TrainStarted(num_steps=6, start_step=3),
            StepEnded(step=3, num_steps=6, metrics={"loss": 3.0, "acc": 0.5}),
            StepEnded(step=4, num_steps=6, metrics={"loss": 4.0}),
        ]
        await drive(CsvMetricsCallback("m.csv"), resumed, events)
    header, rows = read(state.run_dir / "m.csv")
    assert header == ["step", "loss", "acc"]
    assert [(r["step"], r["loss"], r["acc"]) for r in rows] == [
        ("0", "0.0", ""),
        ("1", "1.0", ""),
        ("2", "2.0", ""),
        ("3", "3.0", "0.5"),
        ("4", "4.0", ""),
    ]


async def test_many_steps_one_row_each(tmp_path: Path) -> None:
    state = make_state(tmp_path, num_steps=500)
    with anyio.fail_after(WAIT):
        await drive(CsvMetricsCallback("m.csv"), state, run_events(500, lambda i: {"loss": i / 7}))
    _, rows = read(state.run_dir / "m.csv")
    assert [int(r["step"]) for r in rows] == list(range(500))
    assert all(float(r["loss"]) == i / 7 for i, r in enumerate(rows))


async def test_only_rank_zero_writes(tmp_path: Path) -> None:
    state = make_state(tmp_path, num_steps=3, rank=1)
    with anyio.fail_after(WAIT):
        await drive(CsvMetricsCallback("m.csv"), state, run_events(3))
    assert not (state.run_dir / "m.csv").exists()


def test_config() -> None:
    (cb,) = ev.build_callbacks(
        [{"kind": "csv_metrics", "params": {"out_path": "x.csv", "delimiter": "\t"}}]
    )
    assert isinstance(cb, CsvMetricsCallback)
    with pytest.raises(ev.ConfigError, match="missing required field 'out_path'"):
        ev.build_callbacks([{"kind": "csv_metrics", "params": {}}])
    with pytest.raises(ev.ConfigError, match="one character"):
        ev.build_callbacks(
            [{"kind": "csv_metrics", "params": {"out_path": "x", "delimiter": ",,"}}]
        )
