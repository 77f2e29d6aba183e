"""wandb_logger: offline runs read back from wandb's own transaction log; a failing
init costs one WARNING; a hung finish cannot hold the shutdown."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks.wandb_logger import WandbLoggerCallback
from evsys_async.events import StepEnded, TrainStarted
from tests.callbacks.helpers import WAIT, drive, make_state, run_events, wandb_history

pytestmark = pytest.mark.anyio


async def test_offline_history_read_back(tmp_path: Path, wandb_env: Path) -> None:
    cb = WandbLoggerCallback(project="p", mode="offline", log_every=2)
    state = make_state(tmp_path, num_steps=6)
    state.ctx.run_config = {"lr": 0.1}
    events = run_events(6, lambda i: {"loss": 1.0 / (i + 1)}, evals={3: {"acc": 0.25}})
    with anyio.fail_after(WAIT):
        await drive(cb, state, events)
    assert "wandb_url" in state.ctx.extras  # None offline: there is no server URL
    rows = wandb_history(tmp_path / "r1")
    by_step = {r["_step"]: r for r in rows}
    assert sorted(by_step) == [1, 3, 5]  # (step+1) % log_every == 0, the rule of every cadence
    assert by_step[1]["loss"] == 0.5
    assert by_step[3]["loss"] == 0.25 and by_step[3]["val/acc"] == 0.25  # same step, one row
    assert by_step[5]["loss"] == pytest.approx(1 / 6)
    assert cb.run is None  # finished in teardown


async def test_cadence_keeps_the_last_step_prefix_names_and_the_config_of_train_started(
    tmp_path: Path, wandb_env: Path
) -> None:
    """A run stopped after step 6 of 12, log_every=4: step 3 by the cadence, step 6 as the
    last that ran; the eval at its step; every name behind the prefix; the config the loop
    recorded in TrainStarted."""
    cb = WandbLoggerCallback(project="p", mode="offline", log_every=4, prefix="train")
    state = make_state(tmp_path, num_steps=12)
    state.ctx.run_config = {"lr": 0.1}
    events = run_events(7, evals={5: {"acc": 0.5}}, status="stopped")
    events[0] = TrainStarted(num_steps=12, config={"lr": 0.1, "opt": {"name": "sgd"}})
    events = [
        StepEnded(step=e.step, num_steps=12, metrics=e.metrics) if isinstance(e, StepEnded) else e
        for e in events
    ]
    with anyio.fail_after(WAIT):
        await drive(cb, state, events)
    rows = wandb_history(tmp_path / "r1")
    logged = {r["_step"]: r for r in rows}
    assert sorted(logged) == [3, 5, 6]
    assert set(logged[3]) >= {"train/loss"} and "train/loss" not in logged[5]
    assert logged[5]["train/val/acc"] == 0.5 and logged[6]["train/loss"] == pytest.approx(1 / 7)
    config = wandb_config(tmp_path / "r1")
    assert (config["lr"], config["opt"]) == (0.1, {"name": "sgd"})
    assert cb.degraded is None


async def test_a_log_wandb_refuses_is_counted_and_degrades(tmp_path: Path, wandb_env: Path) -> None:
    class Run:
        url = None

        def log(self, data: Any, step: int | None = None) -> None:
            if step is not None and step >= 2:
                raise ConnectionError("wandb service gone")

        def finish(self) -> None:
            return None

    cb = WandbLoggerCallback(mode="offline")
    cb._wandb = type("FakeWandb", (), {"init": staticmethod(lambda **kw: Run())})
    with anyio.fail_after(WAIT):
        await drive(cb, make_state(tmp_path, num_steps=5), run_events(5))
    assert cb.degraded is not None
    assert cb.degraded.reason == "3 metrics not sent: ConnectionError: wandb service gone"
    assert (cb.degraded.rows_lost, cb.degraded.missing_from_step) == (3, 2)


async def test_failing_init_is_one_warning_and_the_run_goes_on(
    tmp_path: Path,
    wandb_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    import wandb

    def broken(**kw: Any) -> Any:
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    cb = WandbLoggerCallback(mode="offline")
    with anyio.fail_after(WAIT):
        sub = await drive(
            cb, make_state(tmp_path, num_steps=5), run_events(5, evals={2: {"acc": 1.0}})
        )
    warnings = [r for r in warnings_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "wandb init failed; wandb_logger is off for this run" in warnings[0].getMessage()
    assert "RuntimeError: no network" in warnings[0].getMessage()
    assert sub.stats().failed == 0 and sub.stats().delivered == 8  # every event of the run


async def test_hung_finish_is_abandoned_after_the_deadline(
    tmp_path: Path, wandb_env: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    class Run:
        url = "https://wandb.example/r"
        logged: ClassVar[list[Any]] = []

        def log(self, data: Any, step: int | None = None) -> None:
            self.logged.append((step, data))

        def finish(self) -> None:
            release.wait(60)  # a hung upload

    cb = WandbLoggerCallback(mode="offline", finish_timeout=0.2)
    cb._wandb = type("FakeWandb", (), {"init": staticmethod(lambda **kw: Run())})
    state = make_state(tmp_path, num_steps=3)
    with anyio.fail_after(WAIT):
        try:
            await drive(cb, state, run_events(3))
        finally:
            release.set()
    assert state.ctx.extras["wandb_url"] == "https://wandb.example/r"
    assert [s for s, _ in Run.logged] == [0, 1, 2]
    assert cb.degraded is not None and "may not all be synced" in cb.degraded.reason
    assert any(
        "wandb finish did not return in time; abandoned" in r.getMessage()
        for r in warnings_log.records
    )


async def test_only_rank_zero_logs(tmp_path: Path, wandb_env: Path) -> None:
    with anyio.fail_after(WAIT):
        await drive(
            WandbLoggerCallback(mode="offline"),
            make_state(tmp_path, num_steps=2, rank=1),
            run_events(2),
        )
    assert not (tmp_path / "r1").exists()


def test_missing_extra_fails_at_build_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ev.MissingExtraError, match=r"pip install 'evsys-async\[wandb\]'"):
        ev.build_callbacks([{"kind": "wandb_logger", "params": {"mode": "offline"}}])


def test_config() -> None:
    (cb,) = ev.build_callbacks(
        [
            {
                "kind": "wandb_logger",
                "params": {"project": "p", "mode": "offline", "max_pred_rows": 5},
            }
        ]
    )
    assert isinstance(cb, WandbLoggerCallback) and cb.max_pred_rows == 5
    with pytest.raises(ev.ConfigError, match="mode"):
        ev.build_callbacks([{"kind": "wandb_logger", "params": {"mode": "offlin"}}])


def wandb_config(run_dir: Path) -> dict[str, Any]:
    """The run's config as wandb's own log holds it (its last update of each key)."""
    import json

    from tests.callbacks.helpers import read_wandb_records

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config: dict[str, Any] = {}
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
    return config
