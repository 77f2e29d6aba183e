"""The README's example: a loop with a custom async callback and an async evaluator."""

import anyio

import evsys_async as ev


class LossAlarm(ev.Callback):
    async def on_step_end(self, state, step_idx, batch, metrics):
        if metrics["loss"] > 10:
            state.request_stop("loss exploded")


class Accuracy:
    name, run_every = "val", 10

    async def evaluate(self, state, step_idx):
        return {"acc": min(1.0, step_idx / 100)}  # e.g. await an eval server here


async def step(state, step_idx):
    return {"loss": 1.0 / (step_idx + 1)}


async def main():
    loop = ev.TrainingLoop(
        step, num_steps=100, output_dir="runs", run_key="readme", config={"lr": 0.1},
        evaluators=[Accuracy()], callbacks=[LossAlarm(), ev.CsvMetricsCallback("metrics.csv")],
    )  # fmt: skip
    artifacts = await loop.run()
    print(artifacts.status, artifacts.steps_completed, artifacts.run_dir)


if __name__ == "__main__":
    anyio.run(main)
