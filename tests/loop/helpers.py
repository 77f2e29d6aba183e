"""What the loop's tests share: callbacks that record every hook (``def`` and
``async def``), an evaluator, a step."""

from __future__ import annotations

import threading
from typing import Any

import evsys_async as ev

WAIT = 30.0  # the fail_after around every wait: generous, never reached when all is well


class Recorder(ev.Callback):
    """Counts every loop-scope hook, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.ended: ev.LoopArtifacts | None = None
        self.threads: set[int] = set()

    def on_train_start(self, state: ev.LoopState) -> None:
        self.calls.append(("start", state.num_steps))

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.threads.add(threading.get_ident())
        self.calls.append(("step", step_idx))

    def on_eval(self, state: ev.LoopState, step_idx: int, eval_name: str, metrics: Any) -> None:
        self.calls.append(("eval", (step_idx, eval_name, dict(metrics))))

    def on_checkpoint(self, state: ev.LoopState, row: dict[str, Any]) -> None:
        self.calls.append(("ckpt", row["name"]))

    def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        self.ended = artifacts
        self.calls.append(("end", artifacts.status))

    def steps(self) -> list[int]:
        return [v for k, v in self.calls if k == "step"]


class AsyncRecorder(ev.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.status: str | None = None

    async def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
        self.steps.append(step_idx)

    async def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        self.status = artifacts.status


class Acc:
    """An evaluator whose accuracy rises with the step (the original's example shape)."""

    def __init__(self, name: str = "val", run_every: int = 5) -> None:
        self.name = name
        self.run_every = run_every
        self.calls: list[int] = []

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        self.calls.append(step_idx)
        return {"acc": step_idx / 100}


async def loss_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    return {"loss": 1.0 / (step_idx + 1)}
