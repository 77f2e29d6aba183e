"""local_logger: metrics.jsonl, events.jsonl (envelopes, the input of replay),
predictions/<name>.jsonl and summary.md, read back."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks.local_logger import LocalLoggerCallback
from evsys_async.events import CheckpointSaved, StopRequested, TrainEnded
from evsys_async.transports import read_jsonl
from tests.callbacks.helpers import WAIT, drive, make_state, run_events

pytestmark = pytest.mark.anyio


def lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


async def test_every_file_read_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cb = LocalLoggerCallback(print_every=5, keys=["loss"])
    state = make_state(tmp_path, num_steps=12)
    events = run_events(
        12, lambda i: {"loss": 1 / (i + 1), "lr": 0.1}, evals={4: {"acc": 0.25}, 9: {"acc": 0.5}}
    )
    events.insert(-1, CheckpointSaved(step=11, name="final", path="ckpt"))
    events.insert(-1, StopRequested(step=11, reason="r", source="x"))
    events[-1] = TrainEnded(
        status="stopped", steps_completed=12, num_steps=12, stop_reason="plateau"
    )
    with anyio.fail_after(WAIT):
        await drive(cb, state, events)
    run_dir = tmp_path / "r1"

    rows = lines(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(12))
    assert train[2]["metrics"] == {"loss": 1 / 3, "lr": 0.1}
    assert [(r["eval_name"], r["step"], r["metrics"]) for r in val] == [
        ("val", 4, {"acc": 0.25}),
        ("val", 9, {"acc": 0.5}),
    ]

    header = lines(run_dir / "events.jsonl")[0]
    assert header["format"] == "evsys-async/events" and header["version"] == 1
    assert (header["run_key"], header["start_step"], header["evsys_async"]) == (
        "r1",
        0,
        ev.__version__,
    )
    envelopes = list(read_jsonl(run_dir / "events.jsonl"))
    assert [type(e.event) for e in envelopes] == [type(e) for e in events]
    assert [e.event for e in envelopes] == events  # lossless and in order
    seqs = [e.seq for e in envelopes]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len({e.bus_id for e in envelopes}) == 1

    summary = (run_dir / "summary.md").read_text(encoding="utf-8")
    assert (
        "# r1" in summary and "- status: stopped" in summary and "- stop reason: plateau" in summary
    )
    # people read it: steps count from 1, eval metrics named as in metrics.csv
    assert "| loss | 12 | 0.0833 |" in summary
    assert "| val/acc | 10 | 0.5000 |" in summary

    out = capsys.readouterr().out.splitlines()
    assert out == [
        "[5/12] loss=0.2000",
        "[5/12] eval val: acc=0.2500",
        "[10/12] loss=0.1000",
        "[10/12] eval val: acc=0.5000",
        "[12/12] loss=0.0833",
    ]
    assert cb._metrics is None and cb._events is None  # closed in teardown


async def test_predictions_through_dispatch(tmp_path: Path) -> None:
    cb = LocalLoggerCallback(print_every=0)
    ctx = ev.LogContext(output_dir=tmp_path, run_key="arm-a")
    preds = [{"task_id": i, "reward": i / 2} for i in range(3)]
    with anyio.fail_after(WAIT):
        await ev.dispatch(
            [cb],
            "on_benchmark_eval",
            ctx,
            {"name": "math/v1", "metrics": {"acc": 1.0}},
            preds,
            step=7,
        )
        await ev.dispatch([cb], "on_benchmark_eval", ctx, {"name": "math/v1"}, ["raw"], step=None)
    rows = lines(tmp_path / "arm-a" / "predictions" / "math_v1.jsonl")
    assert rows == [
        {"task_id": 0, "reward": 0.0, "benchmark": "math/v1", "step": 7},
        {"task_id": 1, "reward": 0.5, "benchmark": "math/v1", "step": 7},
        {"task_id": 2, "reward": 1.0, "benchmark": "math/v1", "step": 7},
        {"prediction": "raw", "benchmark": "math/v1"},
    ]


class _ClosedStdout:
    """A stdout whose reader went away (``| head``): every write fails."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("stdout", ["none", "closed"])
async def test_printing_nowhere_never_costs_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str
) -> None:
    """No stdout (``pythonw``, ``redirect_stdout(None)``): the lines are dropped, no
    hook fails. A stdout that fails: each flush's lines are tried once (never kept to
    be printed again), and every row still reaches the files."""
    closed = _ClosedStdout()
    monkeypatch.setattr("sys.stdout", None if stdout == "none" else closed)
    cb = LocalLoggerCallback(print_every=1)
    with anyio.fail_after(WAIT):
        sub = await drive(cb, make_state(tmp_path, num_steps=20), run_events(20), wait_each=True)
    run_dir = tmp_path / "r1"
    assert [r["step"] for r in lines(run_dir / "metrics.jsonl")] == list(range(20))
    assert len(list(read_jsonl(run_dir / "events.jsonl"))) == 22
    failures = sub.stats().failed_hooks
    if stdout == "none":
        assert failures == {}
    else:
        assert set(failures) == {"flush"}
        assert closed.writes == failures["flush"] >= 1  # one try per flush that had lines
        assert cb._printed == []


async def test_resume_appends(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        await drive(
            LocalLoggerCallback(print_every=0),
            make_state(tmp_path, num_steps=4),
            run_events(2)[:-1],
        )
        await drive(
            LocalLoggerCallback(print_every=0),
            make_state(tmp_path, num_steps=4, step=2, start_step=2),
            run_events(1),
        )
    rows = lines(tmp_path / "r1" / "metrics.jsonl")
    assert len(rows) == 3
    buses = {e.bus_id for e in read_jsonl(tmp_path / "r1" / "events.jsonl")}
    assert len(buses) == 2  # a new bus id keeps (bus_id, seq) unique
    # a second header marks where the resume began
    headers = [r for r in lines(tmp_path / "r1" / "events.jsonl") if "format" in r]
    assert [h["start_step"] for h in headers] == [0, 2]


async def test_only_rank_zero_writes(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        await drive(
            LocalLoggerCallback(print_every=0),
            make_state(tmp_path, num_steps=3, rank=2),
            run_events(3),
        )
    assert not (tmp_path / "r1").exists()


def test_config() -> None:
    (cb,) = ev.build_callbacks(
        [{"kind": "local_logger", "params": {"print_every": 0, "keys": ["loss"]}}]
    )
    assert isinstance(cb, LocalLoggerCallback) and cb.keys == ["loss"]
