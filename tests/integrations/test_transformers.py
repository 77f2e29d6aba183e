"""The Hugging Face bridge (``integrations/transformers.py``) inside a real ``Trainer.train``.

A tiny model built here, on CPU, nothing downloaded (``HF_HUB_OFFLINE=1``): the
callbacks see the ``Trainer``'s logs, evals and saves in order, with the very values
in its ``log_history``; a stop a ``controls_loop`` callback asks on step k ends
training after step k; a failing, hanging or crashing callback never stalls it; the
run dir is a loop run's.
"""

from __future__ import annotations

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
hf = pytest.importorskip("transformers", reason=f"needs transformers: {INSTALL}")
pytest.importorskip("accelerate", reason=f"needs accelerate: {INSTALL}")

from evsys_async.integrations.transformers import EvsysCallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class Tiny(torch.nn.Module):  # type: ignore[misc]
    """A linear regression, the shape a ``Trainer`` wants: a dict with ``loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def forward(self, x: Any, labels: Any = None) -> dict[str, Any]:
        out = self.layer(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def train(tmp_path: Path, bridge: EvsysCallback, *, steps: int = 10) -> Any:
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
    data = [{"x": xs[i], "labels": ys[i]} for i in range(64)]
    args = hf.TrainingArguments(
        output_dir=str(tmp_path / "hf-out"),
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=5,
        save_strategy="steps",
        save_steps=5,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=0.05,
        seed=0,
    )
    trainer = hf.Trainer(
        model=Tiny(), args=args, train_dataset=data, eval_dataset=data[:16], callbacks=[bridge]
    )
    trainer.train()
    return trainer


def test_logs_evals_and_saves_arrive_in_order_with_what_the_trainer_logged(
    tmp_path: Path,
) -> None:
    rec = Recorder()
    csv = {"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}}
    bridge = EvsysCallback([rec, csv], output_dir=tmp_path, run_key="hf")
    trainer = train(tmp_path, bridge)
    five = ["step"] * 5
    assert rec.kinds() == ["start", *five, "eval", "ckpt", *five, "eval", "ckpt", "end"]
    history = trainer.state.log_history
    logged = {
        h["step"] - 1: {k: v for k, v in h.items() if k != "step"} for h in history if "loss" in h
    }
    steps = rec.steps()
    assert steps == {s: logged[s] for s in steps}  # every number the Trainer logged
    assert sorted(steps) == list(range(10))
    evals = [v for k, v in rec.calls if k == "eval"]
    evaluated = [h for h in history if "eval_loss" in h]
    assert [(s, m["loss"]) for s, _, m in evals] == [
        (h["step"] - 1, h["eval_loss"]) for h in evaluated
    ]
    ckpts = [v for k, v in rec.calls if k == "ckpt"]
    assert ckpts == [
        (4, "checkpoint-5", str(tmp_path / "hf-out" / "checkpoint-5")),
        (9, "checkpoint-10", str(tmp_path / "hf-out" / "checkpoint-10")),
    ]
    assert all(Path(path).is_dir() for _, _, path in ckpts)
    assert rec.config is not None and rec.config["max_steps"] == 10  # the training args
    data = manifest(tmp_path / "hf")
    assert (data["status"], data["steps_completed"]) == ("completed", 10)
    assert len((tmp_path / "hf" / "metrics.csv").read_text().splitlines()) == 1 + 10 + 2


def test_a_stop_asked_on_step_k_ends_training_after_step_k(tmp_path: Path) -> None:
    rec = Recorder()
    bridge = EvsysCallback([StopAt(3), rec], output_dir=tmp_path)
    trainer = train(tmp_path, bridge)
    assert sorted(rec.steps()) == [0, 1, 2, 3]
    assert trainer.state.global_step == 4
    assert bridge.artifacts.status == "stopped"


def test_failing_and_hanging_callbacks_never_stall_training(tmp_path: Path) -> None:
    hung, rec = Hanging(), Recorder()
    bridge = EvsysCallback([Failing(), hung, rec], output_dir=tmp_path, drain_timeout=1.0)
    try:
        trainer = train(tmp_path, bridge)
    finally:
        hung.release.set()
    assert trainer.state.global_step == 10 and len(rec.steps()) == 10
    report = bridge.artifacts.callback_report
    assert report["Failing"].failed == 10 and report["Hanging"].stuck and report["Recorder"].ok


def test_close_ends_a_session_whose_training_failed(tmp_path: Path) -> None:
    rec = Recorder()
    bridge = EvsysCallback([rec], output_dir=tmp_path)

    class Boom(EvsysCallback):  # a failure inside train(), after three steps
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 3:
                raise ValueError("nan loss")

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=g), "labels": torch.zeros(1)}] * 16
    args = hf.TrainingArguments(
        output_dir=str(tmp_path / "hf-out"),
        max_steps=10,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        per_device_train_batch_size=4,
    )
    trainer = hf.Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=[bridge, Boom()])

    def train_as_documented() -> None:  # docs/trainers.md: close() when train() raises
        try:
            trainer.train()
        except BaseException as exc:
            bridge.close(exc)
            raise

    with pytest.raises(ValueError, match="nan loss"):
        train_as_documented()
    assert rec.calls[-1] == ("end", "failed")
    assert manifest(tmp_path / "run")["error"] == "ValueError: nan loss"


@pytest.mark.slow
def test_a_crashing_process_callback_never_stops_training(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.jsonl")
    bridge = EvsysCallback([Crashing(at=2), Noting(path)], output_dir=tmp_path)
    trainer = train(tmp_path, bridge)
    assert trainer.state.global_step == 10
    assert [n["step"] for n in notes(path) if n["hook"] == "step"] == list(range(10))
    crashed = bridge.artifacts.callback_report["Crashing"]
    assert crashed.disabled is not None and "process died" in crashed.disabled
