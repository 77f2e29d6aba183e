"""The Lightning bridge (``integrations/lightning.py``) inside a real ``Trainer.fit``.

A tiny model built here (no downloads): the callbacks see Lightning's steps, evals and
checkpoints in order, with the very values ``self.log`` logged; a stop a
``controls_loop`` callback asks on step k ends ``fit`` after step k; a failing, hanging
or crashing callback never stalls ``fit``; the run dir is a loop run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integrations.helpers import (
    INSTALL,
    Crashing,
    Failing,
    Hanging,
    Noting,
    Recorder,
    StopAt,
    manifest,
    notes,
)

torch = pytest.importorskip("torch", reason=f"needs torch: {INSTALL}")
pl = pytest.importorskip("lightning.pytorch", reason=f"needs lightning: {INSTALL}")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from evsys_async.integrations.lightning import EvsysCallback  # noqa: E402

pytestmark = [
    # Lightning's own, about this tiny setup (few batches, no workers) or its torch
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class Tiny(pl.LightningModule):  # type: ignore[misc]
    """A linear regression that notes what it logged, by global step."""

    def __init__(self, lr: float = 0.05, fail_at: int = -1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)
        self.logged: dict[int, float] = {}
        self.val_logged: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == self.hparams.fail_at:
            raise ValueError("nan loss")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        self.logged[self.global_step] = loss.item()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_logged.append(self.trainer.callback_metrics["val_loss"].item())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def fit(tmp_path: Path, bridge: EvsysCallback, *, steps: int = 10, **model: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[
            bridge,
            pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=5,
        limit_val_batches=2,
        accelerator="cpu",
        devices=1,
    )
    module = Tiny(**model)
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    return trainer, module


def test_steps_evals_and_checkpoints_arrive_in_order_with_what_lightning_logged(
    tmp_path: Path,
) -> None:
    rec = Recorder()
    csv = {"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}}
    bridge = EvsysCallback([rec, csv], output_dir=tmp_path, run_key="pl")
    trainer, module = fit(tmp_path, bridge)
    five = ["step"] * 5
    assert rec.kinds() == ["start", *five, "ckpt", "eval", *five, "ckpt", "eval", "end"]
    steps = rec.steps()
    assert {s: m["train_loss"] for s, m in steps.items()} == module.logged
    assert all(m["loss"] == m["train_loss"] for m in steps.values())  # training_step's return
    evals = [v for k, v in rec.calls if k == "eval"]
    assert [(s, name) for s, name, _ in evals] == [(4, "val"), (9, "val")]
    assert [m["val_loss"] for _, _, m in evals] == module.val_logged
    assert rec.config == {"lr": 0.05, "fail_at": -1}  # the module's hparams
    assert rec.calls[-1] == ("end", "completed")
    run_dir = tmp_path / "pl"
    data = manifest(run_dir)
    assert (data["status"], data["steps_completed"]) == ("completed", 10)
    assert bridge.artifacts.callback_report["csv_metrics"].ok
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 10 + 2
    rows = [json.loads(line) for line in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert [(r["name"], r["step"]) for r in rows] == [("epoch=0-step=5", 4), ("epoch=0-step=10", 9)]
    assert trainer.global_step == 10


class Returning(Tiny):
    """Logs nothing; returns its loss beside values that are not one number."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.logged[self.global_step] = loss.item()
        return {"loss": loss, "preds": self.layer(x).detach(), "tag": "a", "lr": 0.05}


def test_what_training_step_returns_gives_its_numbers_and_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    bridge = EvsysCallback([rec], output_dir=tmp_path, run_key="ret")
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    trainer = pl.Trainer(
        max_steps=4,
        callbacks=[bridge],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    module = Returning()
    trainer.fit(module, DataLoader(data, batch_size=4))
    steps = rec.steps()
    assert {s: m["loss"] for s, m in steps.items()} == module.logged
    assert all(set(m) == {"loss", "lr"} for m in steps.values())
    assert not [r for r in caplog.records if "not a number" in r.getMessage()]


def test_a_stop_asked_on_step_k_ends_fit_after_step_k(tmp_path: Path) -> None:
    rec = Recorder()
    bridge = EvsysCallback([StopAt(3), rec], output_dir=tmp_path)
    trainer, module = fit(tmp_path, bridge)
    assert sorted(rec.steps()) == [0, 1, 2, 3]
    assert trainer.global_step == 4 and sorted(module.logged) == [0, 1, 2, 3]
    assert bridge.artifacts.status == "stopped"
    assert manifest(tmp_path / "run")["stop_reason"] == "stop at 3"


def test_failing_and_hanging_callbacks_never_stall_fit(tmp_path: Path) -> None:
    hung, rec = Hanging(), Recorder()
    bridge = EvsysCallback([Failing(), hung, rec], output_dir=tmp_path, drain_timeout=1.0)
    try:
        trainer, _ = fit(tmp_path, bridge)
    finally:
        hung.release.set()
    assert trainer.global_step == 10 and len(rec.steps()) == 10
    report = bridge.artifacts.callback_report
    assert report["Failing"].failed == 10
    assert report["Hanging"].stuck
    assert report["Recorder"].ok
    assert manifest(tmp_path / "run")["callback_report"]["Failing"]["failed"] == 10


def test_an_error_in_training_ends_the_session_failed(tmp_path: Path) -> None:
    rec = Recorder()
    bridge = EvsysCallback([rec], output_dir=tmp_path)
    with pytest.raises(ValueError, match="nan loss"):
        fit(tmp_path, bridge, fail_at=3)
    assert rec.calls[-1] == ("end", "failed")
    assert sorted(rec.steps()) == [0, 1, 2]
    assert manifest(tmp_path / "run")["error"] == "ValueError: nan loss"


@pytest.mark.slow
def test_a_crashing_process_callback_never_stops_fit(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.jsonl")
    bridge = EvsysCallback([Crashing(at=2), Noting(path)], output_dir=tmp_path)
    trainer, module = fit(tmp_path, bridge)
    assert trainer.global_step == 10
    seen = [n for n in notes(path) if n["hook"] == "step"]
    assert [n["step"] for n in seen] == list(range(10))
    assert [n["metrics"]["train_loss"] for n in seen] == [module.logged[s] for s in range(10)]
    crashed = bridge.artifacts.callback_report["Crashing"]
    assert crashed.disabled is not None and "process died" in crashed.disabled
