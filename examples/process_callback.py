"""A callback that computes in Python, in its own process: training keeps its speed.

    python examples/process_callback.py

The callback's class is defined at module level (it is pickled to its process)
and the script has a ``__main__`` guard (its process imports this module).
"""

from __future__ import annotations

import time
from typing import Any

import anyio

import evsys_async as ev


class Histogram(ev.Callback):
    """20 ms of pure-Python work per step: a thread would stall training."""

    isolation = "process"  # its own process: the GIL of the loop stays free
    policy = ev.Latest()  # only the newest step matters

    def setup(self, state: ev.LoopState) -> None:
        self.handled = 0

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        end = time.perf_counter() + 0.02
        while time.perf_counter() < end:  # stand-in for plotting, metrics in Python, ...
            pass
        self.handled += 1
        if not metrics["loss"] >= 0:
            state.request_stop("loss is NaN", failed=True)  # reaches the run, as from a thread

    def teardown(self, state: ev.LoopState) -> None:
        print(f"histogram: handled {self.handled} steps, last at step {state.step}")


async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    await anyio.sleep(0.002)  # a GPU-like step: it awaits
    return {"loss": 1.0 / (step_idx + 1)}


def main() -> None:
    loop = ev.TrainingLoop(step, num_steps=300, output_dir="runs", run_key="process-demo",
                           callbacks=[Histogram()])  # fmt: skip
    artifacts = loop.run_sync()
    health = artifacts.callback_report["Histogram"]
    print(artifacts.status, artifacts.steps_completed)
    print(f"its process started in {health.startup_seconds * 1000:.0f} ms; "
          f"{health.delivered} steps delivered, {health.coalesced} coalesced (Latest)")  # fmt: skip


if __name__ == "__main__":  # its process imports this module: keep the run out of it
    main()
