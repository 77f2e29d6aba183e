"""debug_logger: every hook and its arguments, summarised, at DEBUG (or on stdout)."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks.debug_logger import DebugLoggerCallback
from evsys_async.events import CallbackFailed, CheckpointSaved, StopRequested
from tests.callbacks.helpers import WAIT, drive, make_state, run_events

pytestmark = pytest.mark.anyio


async def test_every_hook_at_debug_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="evsys_async")
    events = run_events(3, evals={1: {"acc": 0.5}})
    events.insert(-1, CheckpointSaved(step=2, name="final", row={"name": "final"}))
    events.insert(-1, StopRequested(step=2, reason="why"))
    events.insert(
        -1, CallbackFailed(subscriber="X", hook="on_step_end", event_type="StepEnded", error="boom")
    )
    with anyio.fail_after(WAIT):
        await drive(DebugLoggerCallback(), make_state(tmp_path, num_steps=3), events)
    records = [
        r
        for r in caplog.records
        if r.levelno == logging.DEBUG and "hook: callback=DebugLoggerCallback" in r.getMessage()
    ]
    hooks = [r.getMessage().split("hook=")[1].split(" ")[0] for r in records]
    assert hooks == [
        "on_train_start",
        "on_step_end",
        "on_step_end",
        "on_eval",
        "on_step_end",
        "on_checkpoint",
        "on_event",
        "on_event",
        "on_train_end",
    ]
    messages = [r.getMessage() for r in records]
    assert "metrics={'loss': 0.5}" in messages[2]
    assert "event_type='StopRequested'" in messages[6] and "'reason': 'why'" in messages[6]
    assert "status='completed'" in messages[-1]


async def test_values_cut_to_max_len_and_predictions_to_max_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cb = DebugLoggerCallback(max_len=30, max_pred_rows=2, to_stdout=True)
    ctx = ev.LogContext(output_dir="x", run_key="k")
    preds = [{"task_id": i, "text": "y" * 5} for i in range(10)]
    with anyio.fail_after(WAIT):
        await ev.dispatch([cb], "on_experiment_start", ctx)
        await ev.dispatch(
            [cb], "on_benchmark_eval", ctx, {"name": "b", "metrics": {"acc": 1.0}}, preds, step=3
        )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[debug_logger] on_experiment_start ctx=")
    line = out[1]
    assert line.startswith("[debug_logger] on_benchmark_eval step=3")
    assert "n_predictions=10" in line
    # two rows are 66 chars of repr: cut at 30, the rest counted
    assert "predictions=[{'task_id': 0, 'text': 'yyyyy… (+36 chars)" in line


def test_config() -> None:
    (cb,) = ev.build_callbacks(
        [{"kind": "debug_logger", "params": {"max_len": 10, "to_stdout": True}}]
    )
    assert isinstance(cb, DebugLoggerCallback) and cb.to_stdout
