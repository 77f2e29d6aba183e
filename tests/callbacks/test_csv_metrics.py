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
    with pytest.raises(ev.ConfigError, match="log_every must be >= 1"):
        ev.build_callbacks([{"kind": "csv_metrics", "params": {"out_path": "x", "log_every": 0}}])


# -- cadence, the header at setup, paths -----------------------------------------------


async def test_log_every_writes_every_kth_step_the_last_and_every_eval(tmp_path: Path) -> None:
    import pandas as pd

    state = make_state(tmp_path, num_steps=10)
    events = run_events(10, lambda i: {"loss": float(i)}, evals={4: {"acc": 0.5}, 6: {"acc": 0.6}})
    with anyio.fail_after(WAIT):
        await drive(CsvMetricsCallback("m.csv", log_every=4), state, events)
    frame = pd.read_csv(state.run_dir / "m.csv")
    train = frame[frame["loss"].notna()]
    assert list(train["step"]) == [3, 7, 9]  # (step + 1) % 4 == 0, and the last step
    assert list(frame[frame["val/acc"].notna()]["step"]) == [4, 6]  # evals always


async def test_a_run_stopped_early_still_writes_its_last_step(tmp_path: Path) -> None:
    state = make_state(tmp_path, num_steps=100)
    events = run_events(7, lambda i: {"loss": float(i)})
    events[-1] = TrainEnded(status="stopped", steps_completed=7, num_steps=100)
    with anyio.fail_after(WAIT):
        await drive(CsvMetricsCallback("m.csv", log_every=5), state, events)
    _, rows = read(state.run_dir / "m.csv")
    assert [r["step"] for r in rows] == ["4", "6"]


def test_the_header_is_on_disk_when_setup_returns(tmp_path: Path) -> None:
    """pandas can read the file during a long first step (the peers' expectation)."""
    import pandas as pd

    cb = CsvMetricsCallback("m.csv")
    state = make_state(tmp_path)
    cb.setup(state)
    try:
        frame = pd.read_csv(state.run_dir / "m.csv")
        assert list(frame.columns) == ["step"] and len(frame) == 0
    finally:
        cb.teardown(state)


def test_paths_expand_home_and_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS_AT", str(tmp_path / "elsewhere"))
    assert CsvMetricsCallback("~/m.csv").out_path == tmp_path / "home" / "m.csv"
    assert CsvMetricsCallback("$RUNS_AT/m.csv").out_path == tmp_path / "elsewhere" / "m.csv"
    assert CsvMetricsCallback("${RUNS_AT}/x/m.csv").out_path == tmp_path / "elsewhere/x/m.csv"
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    with pytest.raises(ev.ConfigError, match=r"csv_metrics out_path.*\$NOT_SET_HERE"):
        CsvMetricsCallback("$NOT_SET_HERE/m.csv")
    with pytest.raises(ev.ConfigError, match="NOT_SET_HERE"):
        ev.build_callbacks([{"kind": "csv_metrics", "params": {"out_path": "$NOT_SET_HERE/m"}}])


async def test_a_relative_path_is_under_the_run_dir(tmp_path: Path) -> None:
    state = make_state(tmp_path, num_steps=2)
    with anyio.fail_after(WAIT):
        await drive(CsvMetricsCallback("sub/m.csv"), state, run_events(2))
    assert (tmp_path / "r1" / "sub" / "m.csv").is_file()


async def test_numbers_round_trip_and_non_finite_values_survive(tmp_path: Path) -> None:
    import pandas as pd

    values = [1 / 3, 1e-7, 12345.678901234567, float("nan"), float("inf"), -0.0, 1e300]
    state = make_state(tmp_path, num_steps=len(values))
    events = run_events(len(values), lambda i: {"x": values[i]})
    with anyio.fail_after(WAIT):
        await drive(CsvMetricsCallback("m.csv"), state, events)
    _, rows = read(state.run_dir / "m.csv")
    back = [float(r["x"]) for r in rows]
    assert back[:3] == values[:3] and back[4:] == values[4:]
    assert back[3] != back[3]  # nan
    frame = pd.read_csv(state.run_dir / "m.csv")
    assert frame["x"].iloc[0] == 1 / 3
