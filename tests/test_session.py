"""The session (``evsys_async/session/``): a run around a trainer's own steps.

A ``with`` session runs the bus in a thread of its own (on asyncio or trio), an
``async with`` one on the caller's loop (both backends). Either way the callbacks see
what a loop run's see, in order; a ``controls_loop`` callback's stop is seen by the
check after the step it was asked on; a failing, hanging or crashing callback never
stops the trainer; the run dir, ``manifest.json`` and the report are a loop run's.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.errors import ConfigError
from tests.integrations.helpers import (
    Crashing,
    Failing,
    Hanging,
    Noting,
    Recorder,
    StopAt,
    manifest,
    notes,
)

WAIT = 30.0


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def csv() -> dict[str, Any]:
    return {"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}}


def test_events_reach_the_callbacks_in_order_and_the_files_are_a_runs(
    tmp_path: Path, backend: str
) -> None:
    rec = Recorder()
    with ev.Session(
        [rec, csv(), "local_logger"],
        output_dir=tmp_path,
        run_key="hand",
        config={"lr": 0.1},
        num_steps=5,
        backend=backend,
    ) as session:
        assert session.run_dir == tmp_path / "hand"
        for i in range(5):
            session.step_ended(i, {"loss": 1.0 / (i + 1)})
            assert not session.should_stop
        session.eval_ended(4, "val", {"acc": 0.75})
        session.checkpoint_saved(4, "last", tmp_path / "w.pt", epoch=1)
    assert rec.kinds() == ["start", *["step"] * 5, "eval", "ckpt", "end"]
    assert rec.steps() == {i: {"loss": 1.0 / (i + 1)} for i in range(5)}
    assert rec.calls[-3:] == [
        ("eval", (4, "val", {"acc": 0.75})),
        ("ckpt", (4, "last", str(tmp_path / "w.pt"))),
        ("end", "completed"),
    ]
    assert rec.config == {"lr": 0.1}
    artifacts = session.artifacts
    assert artifacts is not None
    assert (artifacts.status, artifacts.steps_completed) == ("completed", 5)
    assert artifacts.checkpoints[0]["epoch"] == 1
    run_dir = tmp_path / "hand"
    assert (run_dir / "hparams.yaml").read_text(encoding="utf-8") == "lr: 0.1\n"
    data = manifest(run_dir)
    assert (data["status"], data["steps_completed"], data["run_key"]) == ("completed", 5, "hand")
    assert data["callback_report"]["csv_metrics"]["delivered"] == 7  # 5 steps, 1 eval, TrainEnded
    assert all(ev.CallbackHealth(**h).ok for h in data["callback_report"].values())
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,val/acc" and len(rows) == 7
    (ckpt,) = (
        json.loads(line) for line in (run_dir / "checkpoints.jsonl").read_text().splitlines()
    )
    assert (ckpt["name"], ckpt["steps_completed"]) == ("last", 5)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events[1:] if e["event"]["type"] == "TrainStarted")
    assert started["event"]["config"] == {"lr": 0.1}
    assert "completed" in (run_dir / "summary.md").read_text()


def test_a_controls_loop_stop_is_seen_by_the_check_after_its_step(
    tmp_path: Path, backend: str
) -> None:
    stopper, rec = StopAt(3), Recorder()
    checks: list[bool] = []
    with ev.Session([stopper, rec], output_dir=tmp_path, backend=backend) as session:
        for i in range(10):
            session.step_ended(i, {"loss": 1.0})
            checks.append(session.should_stop)
            if checks[-1]:
                break
    assert checks == [False, False, False, True]
    assert stopper.seen == [0, 1, 2, 3]
    assert ("stop", 3) in rec.calls
    artifacts = session.artifacts
    assert artifacts is not None
    assert (artifacts.status, artifacts.stop_reason) == ("stopped", "stop at 3")
    assert manifest(tmp_path / "run")["status"] == "stopped"


def test_neither_a_stop_check_nor_the_end_waits_for_the_batch_delay(
    tmp_path: Path, backend: str
) -> None:
    """Events reach the callbacks in batches every ``batch_delay``; a steering check and
    the drain at the end hurry them (a delay far beyond the test's bound shows it)."""
    stopper, rec = StopAt(3), Recorder()
    checks: list[bool] = []
    started = time.monotonic()
    with ev.Session(
        [stopper, rec], output_dir=tmp_path, backend=backend, batch_delay=4 * WAIT
    ) as session:
        for i in range(10):
            session.step_ended(i, {"loss": 1.0})
            checks.append(session.should_stop)
            if checks[-1]:
                break
    assert time.monotonic() - started < WAIT  # not one batch delay
    assert checks == [False, False, False, True]
    assert rec.kinds() == ["start", *["step"] * 4, "stop", "end"]


def test_a_stop_asked_from_a_callbacks_thread_is_seen_at_the_next_check(tmp_path: Path) -> None:
    asked = threading.Event()

    class Asks(ev.Callback):  # does not steer: the check never waits for it
        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            if step_idx == 1:
                state.request_stop("from a thread")
                asked.set()

    with ev.Session([Asks()], output_dir=tmp_path) as session:
        session.step_ended(0)
        session.step_ended(1)
        assert asked.wait(WAIT)
        assert session.should_stop
        assert session.should_stop  # it stays so
    assert session.artifacts is not None and session.artifacts.status == "stopped"


def test_every_session_is_a_new_run(tmp_path: Path) -> None:
    keys = []
    for _ in range(2):
        with ev.Session(output_dir=tmp_path, run_key="exp") as session:
            session.step_ended(0)
        keys.append(session.run_key)
    assert keys == ["exp", "exp-1"]
    with ev.Session(output_dir=tmp_path, run_key="exp", overwrite=True) as session:
        pass
    assert session.run_key == "exp"
    assert manifest(tmp_path / "exp")["steps_completed"] == 0


def test_a_failing_callback_is_counted_and_the_trainer_goes_on(tmp_path: Path) -> None:
    rec = Recorder()
    with ev.Session([Failing(), rec], output_dir=tmp_path) as session:
        for i in range(20):
            session.step_ended(i, {"loss": 1.0})
            assert not session.should_stop
    assert len(rec.steps()) == 20
    assert session.artifacts is not None
    report = session.artifacts.callback_report
    assert (report["Failing"].failed, report["Failing"].delivered) == (20, 0)
    assert not report["Failing"].ok and report["Recorder"].ok
    assert manifest(tmp_path / "run")["callback_report"]["Failing"]["failed"] == 20


def test_strict_fails_the_run_with_the_callbacks_error(tmp_path: Path) -> None:
    with (  # noqa: PT012
        pytest.raises(RuntimeError, match="hostile at 0"),
        ev.Session([Failing()], output_dir=tmp_path, strict=True) as session,
    ):
        session.step_ended(0)
        assert session.should_stop  # the steering check saw the failure
    assert session.artifacts is not None
    assert (session.artifacts.status, session.artifacts.error) == (
        "failed",
        "RuntimeError: hostile at 0",
    )


def test_a_hanging_callback_is_left_behind_at_drain_timeout(tmp_path: Path) -> None:
    hung, rec = Hanging(), Recorder()
    try:
        with ev.Session([hung, rec], output_dir=tmp_path, drain_timeout=0.5) as session:
            for i in range(5):
                session.step_ended(i)
            assert hung.entered.wait(WAIT)
    finally:
        hung.release.set()
    assert len(rec.steps()) == 5
    assert session.artifacts is not None
    health = session.artifacts.callback_report["Hanging"]
    assert health.stuck and health.pending + health.dropped >= 4
    assert session.artifacts.callback_report["Recorder"].ok


def test_an_exception_in_the_block_fails_the_run_and_propagates(tmp_path: Path) -> None:
    rec = Recorder()
    with pytest.raises(ValueError, match="nan loss"), ev.Session([rec], output_dir=tmp_path):
        raise ValueError("nan loss")
    assert rec.calls[-1] == ("end", "failed")
    data = manifest(tmp_path / "run")
    assert (data["status"], data["error"]) == ("failed", "ValueError: nan loss")
    assert "nan loss" in (tmp_path / "run" / "error.txt").read_text()


def test_keyboard_interrupt_ends_the_run_cancelled(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), ev.Session(output_dir=tmp_path) as session:
        raise KeyboardInterrupt
    assert session.artifacts is not None and session.artifacts.status == "cancelled"


def test_step_ended_from_many_threads_is_counted_once_each(tmp_path: Path) -> None:
    rec = Recorder()
    with ev.Session([rec], output_dir=tmp_path) as session:

        def publish(base: int) -> None:
            for i in range(100):
                session.step_ended(base + i, {"x": float(i)})

        threads = [threading.Thread(target=publish, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    assert len(rec.steps()) == 400
    assert session.artifacts is not None
    assert session.artifacts.callback_report["Recorder"].delivered == 402  # start, end


def test_misuse_is_a_clear_error(tmp_path: Path) -> None:
    session = ev.Session(output_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"step_ended\(\) was called before `with session:`"):
        session.step_ended(0)
    with session:
        session.step_ended(0, {"loss": "nan?"})  # skipped, one WARNING: the loop's rule
    strict = ev.Session(output_dir=tmp_path, run_key="strict", strict=True)
    with strict, pytest.raises(TypeError, match="metric 'loss'"):
        strict.step_ended(0, {"loss": "nan?"})
    with pytest.raises(RuntimeError, match="after the session ended"):
        _ = session.should_stop
    with pytest.raises(RuntimeError, match="a Session runs once"), session:
        pass
    with pytest.raises(TypeError, match=r"callbacks\[0\] is the class Recorder"):
        ev.Session([Recorder])
    with pytest.raises(ConfigError, match=r"callbacks\[1\].params.patiense"):
        ev.Session([Recorder(), {"kind": "early_stopping", "params": {"patiense": 3}}])
    with pytest.raises(ValueError, match="control_timeout must be a number of seconds > 0"):
        ev.Session(control_timeout=0)
    with pytest.raises(ValueError, match=r"drain_timeout must be .* got '60'"):
        ev.Session(drain_timeout="60")  # type: ignore[arg-type]
    for bad in (-1, "0.1", float("inf"), True):
        with pytest.raises(ValueError, match=rf"batch_delay must be .* >= 0, got {bad!r}"):
            ev.Session(batch_delay=bad)  # type: ignore[arg-type]
    ev.Session(batch_delay=0)  # hand each event over at once
    rec = Recorder()
    with pytest.raises(ValueError, match=r"callbacks\[1\] is the same Recorder"):
        ev.Session([rec, rec])


@pytest.mark.anyio
async def test_async_with_runs_on_the_callers_loop(tmp_path: Path) -> None:
    stopper, rec = StopAt(2), Recorder()
    with anyio.fail_after(WAIT):
        async with ev.Session([stopper, rec, csv()], output_dir=tmp_path) as session:
            for i in range(10):
                session.step_ended(i, {"loss": float(i)})
                with pytest.raises(RuntimeError, match=r"await session\.check_stop"):
                    _ = session.should_stop
                if await session.check_stop():
                    break
            session.eval_ended(i, "val", {"acc": 1.0})
    assert rec.kinds() == ["start", "step", "step", "step", "stop", "eval", "end"]
    assert session.artifacts is not None and session.artifacts.status == "stopped"
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 5


@pytest.mark.anyio
async def test_async_with_ends_cancelled_when_its_scope_is(tmp_path: Path) -> None:
    rec = Recorder()
    with anyio.fail_after(WAIT), anyio.CancelScope() as scope:
        async with ev.Session([rec], output_dir=tmp_path) as session:
            session.step_ended(0)
            scope.cancel()
            await anyio.sleep_forever()
    assert rec.calls[-1] == ("end", "cancelled")
    assert session.artifacts is not None and session.artifacts.status == "cancelled"


@pytest.mark.slow
def test_a_crashing_process_callback_never_stops_the_trainer(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.jsonl")
    with ev.Session([Crashing(at=2), Noting(path)], output_dir=tmp_path) as session:
        for i in range(6):
            session.step_ended(i, {"loss": float(i)})
            assert not session.should_stop
        session.eval_ended(5, "val", {"acc": 0.5})
    seen = notes(path)
    assert [n["step"] for n in seen if n["hook"] == "step"] == list(range(6))
    assert seen[-1] == {"pid": seen[0]["pid"], "hook": "end", "status": "completed"}
    assert session.artifacts is not None
    crashed = session.artifacts.callback_report["Crashing"]
    assert crashed.disabled is not None and "process died" in crashed.disabled
    assert session.artifacts.status == "completed"


def test_the_pages_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "trainers.md").read_text()
    example = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        exec(compile(example, "docs/trainers.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out.splitlines()[-1] == "completed runs/mnist"
    assert len((tmp_path / "runs" / "mnist" / "metrics.csv").read_text().splitlines()) == 111


def test_a_sessions_hyperparameters_are_recorded_with_credentials_masked(tmp_path: Path) -> None:
    url = "redis://:hunter2-secret@127.0.0.1:6379/0"
    config = {"lr": 0.1, "store": url, "api_key": "sk-hunter2-secret"}
    with ev.Session(output_dir=tmp_path, run_key="masked", config=config) as session:
        session.step_ended(0, {"loss": 1.0})
    for path in (tmp_path / "masked").rglob("*"):
        if path.is_file():
            assert "hunter2" not in path.read_text(encoding="utf-8", errors="replace"), path
    assert "lr: 0.1" in (tmp_path / "masked" / "hparams.yaml").read_text(encoding="utf-8")


def test_device_metrics_are_converted_off_the_callers_thread_in_order(tmp_path: Path) -> None:
    from tests.loop.devices import Conversions, OnDevice

    conversions = Conversions()
    rec = Recorder()
    caller = threading.current_thread().name
    with ev.Session(callbacks=[rec], output_dir=tmp_path, run_key="gpu") as session:
        for i in range(20):
            session.step_ended(i, {"loss": OnDevice(float(i), conversions), "lr": 0.1})
            if i == 9:
                session.eval_ended(i, "val", {"acc": OnDevice(0.5, conversions)})
                session.checkpoint_saved(i, "mid")
    assert len(conversions.threads) == 21
    assert caller not in conversions.threads
    assert rec.steps() == {i: {"loss": float(i), "lr": 0.1} for i in range(20)}
    kinds = rec.kinds()
    assert kinds[:11] == ["start", *["step"] * 10]
    assert kinds[11:13] == ["eval", "ckpt"]
    assert kinds[13:] == [*["step"] * 10, "end"]


def test_progress_lines_without_a_known_number_of_steps_show_the_step_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ev.Session(["local_logger", "print_progress"], output_dir=tmp_path) as session:
        for i in range(3):
            session.step_ended(i, {"loss": 0.5})
        session.eval_ended(2, "val", {"acc": 0.75})
    out = capsys.readouterr().out
    assert "[3] loss=0.5000" in out and "[3] eval val: acc=0.7500" in out
    assert "/0]" not in out
