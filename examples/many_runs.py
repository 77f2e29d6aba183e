"""Many runs in one process: a learning-rate sweep whose runs share one event loop.

Each run has its own run key, run dir and callbacks; all publish on one bus.
One learning rate is too high and its run fails: its siblings go on, because
each run's task catches its own failure (an exception escaping a task would
cancel the whole task group).

    python examples/many_runs.py [--backend trio]
"""

from __future__ import annotations

import argparse
from functools import partial

import anyio

import evsys_async as ev

TARGET = 3.0


async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    lr = state.ctx.run_config["lr"]
    weight = 0.0 if state.model is None else state.model
    weight -= lr * 2 * (weight - TARGET)  # gradient descent on (w - TARGET)^2
    if abs(weight) > 1e6:
        raise FloatingPointError(f"diverged at lr={lr}")
    state.model = weight
    await anyio.sleep(0.001)  # as a step on an accelerator would await
    return {"loss": (weight - TARGET) ** 2}


async def run_one(loop: ev.TrainingLoop, results: dict[str, str]) -> None:
    try:
        artifacts = await loop.run()
        results[loop.run_key] = f"{artifacts.status} after {artifacts.steps_completed} steps"
    except Exception as exc:  # this run failed; its siblings go on
        results[loop.run_key] = f"failed: {exc}"


async def main(
    output_dir: str = "runs/sweep", lrs: tuple[float, ...] = (0.01, 0.1, 0.4, 1.5)
) -> dict[str, str]:
    results: dict[str, str] = {}
    async with ev.EventBus() as bus, anyio.create_task_group() as tg:
        for lr in lrs:
            callbacks = ev.build_callbacks(
                [
                    {"kind": "local_logger", "params": {"print_every": 0}},
                    {"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}},
                ]
            )
            loop = ev.TrainingLoop(
                step, num_steps=200, output_dir=output_dir, run_key=f"lr-{lr}",
                callbacks=callbacks, bus=bus,
            )  # fmt: skip
            loop.ctx.run_config["lr"] = lr  # the step reads it: state.ctx.run_config
            tg.start_soon(run_one, loop, results)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    for key, outcome in sorted(anyio.run(partial(main), backend=args.backend).items()):
        print(f"{key}: {outcome}")
