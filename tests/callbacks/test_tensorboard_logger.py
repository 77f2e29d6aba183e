"""tensorboard_logger: real event files, read back record by record."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks.tensorboard_logger import TensorBoardLoggerCallback
from tests.callbacks.helpers import WAIT, drive, make_state, read_tfevents, run_events

pytestmark = pytest.mark.anyio


async def test_scalars_per_step_and_eval_in_one_dir_per_run(tmp_path: Path) -> None:
    cb = TensorBoardLoggerCallback()
    state = make_state(tmp_path, num_steps=20)
    events = run_events(
        20,
        lambda i: {"loss": 1.0 / (i + 1), "lr": 0.5},
        evals={9: {"acc": 0.25}, 19: {"acc": 0.75}},
    )
    with anyio.fail_after(WAIT):
        await drive(cb, state, events)
    log_dir = tmp_path / "r1" / "tensorboard"
    assert cb.run_log_dir == log_dir
    scalars = read_tfevents(log_dir)
    loss = [(s, v) for t, s, v in scalars if t == "loss"]
    assert [s for s, _ in loss] == list(range(20))
    assert all(v == pytest.approx(1.0 / (s + 1), rel=1e-6) for s, v in loss)  # float32 on disk
    assert len([1 for t, _, _ in scalars if t == "lr"]) == 20
    assert [(s, v) for t, s, v in scalars if t == "val/acc"] == [(9, 0.25), (19, 0.75)]
    assert cb._writer is None  # closed in teardown


async def test_log_dir_gets_a_subdir_per_run_key(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        for key in ("a", "b"):
            cb = TensorBoardLoggerCallback(log_dir=tmp_path / "tb", flush_secs=5)
            await drive(cb, make_state(tmp_path, run_key=key, num_steps=2), run_events(2))
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["a", "b"]
    assert len(read_tfevents(tmp_path / "tb" / "a")) == 2


async def test_benchmark_metrics_through_dispatch(tmp_path: Path) -> None:
    cb = TensorBoardLoggerCallback()
    state = make_state(tmp_path, num_steps=1)
    async with ev.EventBus() as bus:
        from evsys_async.callbacks._adapter import CallbackAdapter

        sub = CallbackAdapter(cb, state).subscribe(bus)
        with anyio.fail_after(10):  # setup has run once the first event it handles is handled
            await bus.publish_and_wait(
                ev.events.StepEnded(step=0, num_steps=1, metrics={"loss": 1.0})
            )
        await ev.dispatch(
            [cb],
            "on_benchmark_eval",
            state.ctx,
            {"name": "b", "metrics": {"acc": 0.5, "n": "x"}},
            [],
            step=3,
        )
        assert await sub.aclose(10)
    assert read_tfevents(tmp_path / "r1" / "tensorboard") == [
        ("loss", 0, 1.0),
        ("eval/b/acc", 3, 0.5),
    ]


async def test_only_rank_zero_writes(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        await drive(
            TensorBoardLoggerCallback(), make_state(tmp_path, num_steps=2, rank=1), run_events(2)
        )
    assert not (tmp_path / "r1").exists()


def test_missing_extra_fails_at_build_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
    with pytest.raises(ev.MissingExtraError, match=r"pip install 'evsys-async\[tensorboard\]'"):
        TensorBoardLoggerCallback()
    with pytest.raises(
        ev.MissingExtraError,
        match="tensorboard_logger needs the optional dependency 'tensorboardX'",
    ):
        ev.build_callbacks([{"kind": "tensorboard_logger"}])


@pytest.mark.slow
def test_import_evsys_async_does_not_import_extras() -> None:
    import subprocess

    code = "import sys, evsys_async as ev; ev.list_callbacks(); print(sorted(m for m in ('tensorboardX', 'wandb') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
