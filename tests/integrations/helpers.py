"""What the bridges' tests share: callbacks that record, steer, fail, hang or crash.

They live at module level in a module with light imports (no torch, no Lightning),
so that a callback with ``isolation = "process"`` pickles by reference and its child
imports it quickly. What a child saw comes back through a file of JSON lines.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import evsys_async as ev

#: the install command a skipped test names (torch pinned: the CPU build on this machine)
INSTALL = "pip install -c <(echo torch==2.13.0) -e '.[test-integrations]'"


class Recorder(ev.Callback):
    """Every loop-scope hook, in order, with its step and metrics (in this process)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.config: dict[str, Any] | None = None

    def on_train_start(self, state: ev.LoopState) -> None:
        self.calls.append(("start", state.num_steps))
        self.config = dict(state.ctx.run_config)

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.calls.append(("step", (step_idx, dict(metrics))))

    def on_eval(self, state: ev.LoopState, step_idx: int, eval_name: str, metrics: Any) -> None:
        self.calls.append(("eval", (step_idx, eval_name, dict(metrics))))

    def on_checkpoint(self, state: ev.LoopState, row: dict[str, Any]) -> None:
        self.calls.append(("ckpt", (row["step"], row["name"], row["path"])))

    def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
        if isinstance(event, ev.events.StopRequested):
            self.calls.append(("stop", event.step))

    def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        self.calls.append(("end", artifacts.status))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.calls]

    def steps(self) -> dict[int, dict[str, float]]:
        return {s: m for k, (s, m) in ((k, v) for k, v in self.calls if k == "step")}


class StopAt(ev.Callback):
    """Steers: asks to stop on step ``at``'s event, and notes each step it saw."""

    controls_loop = True

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen: list[int] = []

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.seen.append(step_idx)
        if step_idx == self.at:
            state.request_stop(f"stop at {self.at}")


class Failing(ev.Callback):
    """Raises on every step."""

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        raise RuntimeError(f"hostile at {step_idx}")


class Hanging(ev.Callback):
    """Blocks in its first step until ``release`` is set (a hung logger)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.entered.set()
        self.release.wait(60)


class Crashing(ev.Callback):
    """In its own process: the process dies on step ``at``."""

    isolation = "process"

    def __init__(self, at: int = 2) -> None:
        self.at = at

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        if step_idx == self.at:
            os._exit(3)


class Sleeping(ev.Callback):
    """Sleeps ``seconds`` per step, in its own thread (the benchmark's slow logger)."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        time.sleep(self.seconds)


class Burning(ev.Callback):
    """Computes in Python for ``seconds`` per step, in its own process."""

    isolation = "process"

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        end = time.perf_counter() + self.seconds
        x = 0
        while time.perf_counter() < end:
            x += 1


class Noting(ev.Callback):
    """In its own process: one JSON line per hook into ``path`` (read back with ``notes``)."""

    isolation = "process"

    def __init__(self, path: str) -> None:
        self.path = path

    def _note(self, **fields: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self._note(hook="step", step=step_idx, metrics=dict(metrics))

    def on_eval(self, state: ev.LoopState, step_idx: int, eval_name: str, metrics: Any) -> None:
        self._note(hook="eval", step=step_idx, eval_name=eval_name, metrics=dict(metrics))

    def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        self._note(hook="end", status=artifacts.status)


def notes(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]


def manifest(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    return data
