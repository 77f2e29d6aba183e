"""Bridges: steps/s of Lightning, Hugging Face's Trainer and a hand-written torch loop,
bare, with their own 20 ms callback inline, and with evsys-async callbacks through the
bridge (``evsys_async.integrations``, ``evsys_async.Session``).

Run: ``python benchmarks/bench_bridges.py`` (about six minutes; ``--quick`` for a
smoke run). Needs torch, lightning, transformers and accelerate
(``pip install -c <(echo torch==2.13.0) -e '.[test-integrations]'``); a framework
that is missing is skipped and the script says so.

Every step is a tiny model's forward, backward and optimizer step plus 2 ms of
sleep (the rest of a real step: data, a bigger model; ``--wait-ms``, 0 for the
model alone), logging its loss. Per
framework, in one run, interleaved (each round runs every scenario once, in a
rotated order; figures are medians over the rounds, ratios medians of the per-round
pairs with that round's bare run):

(torch runs with one thread: for a tiny model its pool would only contend.)

* ``bare`` — no callback, no logger;
* ``inline 20 ms`` — the framework's own callback sleeping 20 ms per step (what a
  slow logger costs today);
* ``bridge: 20 ms sleep`` — the bridge with an evsys-async callback sleeping 20 ms
  per step (its own thread);
* ``bridge: 20 ms CPU, process`` — the bridge with a callback computing 20 ms of
  Python per step, ``isolation="process"``;
* ``bridge: loggers`` — the bridge with the everyday loggers (``csv_metrics``,
  ``local_logger``, ``tensorboard_logger``).

steps/s counts from the first step's start to the last step's end (the session's
start and its drain are outside, as a loop's ``train_seconds``); ``fit s`` is the
whole call, drain included. Every bridge figure is checked first: each callback
handled every step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_count, fmt, machine, med, print_table, run_main, spread

import evsys_async as ev

#: the rest of a step beside the tiny model (data, a bigger model): a sleep; --wait-ms
STEP_S = 0.002


def _wait() -> None:
    if STEP_S:
        time.sleep(STEP_S)


CB_S = 0.020
WIDTH = 16


@dataclass
class Result:
    steps: int
    train_s: float
    wall_s: float

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.train_s


# -- the evsys-async callbacks (module level: a process callback pickles by reference) ----


class Sleeping(ev.Callback):
    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        time.sleep(CB_S)


class Burning(ev.Callback):
    isolation = "process"

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        end = time.perf_counter() + CB_S
        while time.perf_counter() < end:
            pass


def loggers() -> list[Any]:
    return [
        {"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}},
        "local_logger",
        "tensorboard_logger",
    ]


# scenario key -> (label, the bridge's callbacks or None, the framework's own slow callback)
SCENARIOS: dict[str, tuple[str, Callable[[], list[Any]] | None, bool]] = {
    "bare": ("bare", None, False),
    "inline": ("inline 20 ms (its own callback)", None, True),
    "sleep": ("bridge: 20 ms sleep", lambda: [Sleeping()], False),
    "cpu": ("bridge: 20 ms CPU, process", lambda: [Burning()], False),
    "loggers": ("bridge: loggers (csv, local, tensorboard)", loggers, False),
}


def check(bridge: Any, n: int) -> None:
    """A bridge figure counts only if every callback handled every step."""
    for name, health in bridge.artifacts.callback_report.items():
        steps = health.delivered - _OTHER_EVENTS.get(name, 2)  # TrainStarted, TrainEnded
        check_count(f"bridge callback {name}", steps, n)


#: what each callback takes beside the steps (default: TrainStarted and TrainEnded);
#: csv_metrics takes TrainEnded only (it writes the last step of a run stopped off its cadence)
_OTHER_EVENTS = {"Sleeping": 0, "Burning": 0, "csv_metrics": 1}


# -- Lightning ------------------------------------------------------------------------------


def run_lightning(scenario: str, n: int, out: str) -> Result:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from evsys_async.integrations.lightning import EvsysCallback

    _, make, inline = SCENARIOS[scenario]

    class Timer(pl.Callback):  # type: ignore[misc]
        t0 = t1 = 0.0
        n = 0

        def on_train_batch_start(self, *args: Any) -> None:
            self.t0 = self.t0 or time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            if inline:
                time.sleep(CB_S)
            self.n += 1
            self.t1 = time.perf_counter()

    class Model(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(WIDTH, WIDTH)

        def training_step(self, batch: Any, idx: int) -> Any:
            _wait()
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    timer = Timer()
    bridge = None if make is None else EvsysCallback(make(), output_dir=out)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer] if bridge is None else [timer, bridge],
    )
    data = DataLoader(TensorDataset(torch.randn(n, WIDTH)), batch_size=1)
    gc.collect()
    t0 = time.perf_counter()
    trainer.fit(Model(), data)
    wall = time.perf_counter() - t0
    check_count("lightning steps", timer.n, n)
    if bridge is not None:
        check(bridge, n)
    return Result(n, (timer.t1 - timer.t0) * n / (n - 1), wall)


# -- Hugging Face ---------------------------------------------------------------------------


def run_hf(scenario: str, n: int, out: str) -> Result:
    import torch
    import transformers as hf

    from evsys_async.integrations.transformers import EvsysCallback

    _, make, inline = SCENARIOS[scenario]

    class Timer(hf.TrainerCallback):  # type: ignore[misc]
        t0 = t1 = 0.0
        n = 0

        def on_step_begin(self, *args: Any, **kw: Any) -> None:
            self.t0 = self.t0 or time.perf_counter()

        def on_step_end(self, *args: Any, **kw: Any) -> None:
            if inline:
                time.sleep(CB_S)
            self.n += 1
            self.t1 = time.perf_counter()

    class Model(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(WIDTH, WIDTH)

        def forward(self, x: Any) -> dict[str, Any]:
            _wait()
            return {"loss": self.layer(x).pow(2).mean()}

    timer = Timer()
    bridge = None if make is None else EvsysCallback(make(), output_dir=out)
    args = hf.TrainingArguments(
        output_dir=os.path.join(out, "hf"),
        max_steps=n,
        per_device_train_batch_size=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        log_level="error",
    )
    data = [{"x": torch.randn(WIDTH)} for _ in range(n)]
    cbs = [timer] if bridge is None else [timer, bridge]
    trainer = hf.Trainer(model=Model(), args=args, train_dataset=data, callbacks=cbs)
    gc.collect()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    check_count("hf steps", timer.n, n)
    if bridge is not None:
        check(bridge, n)
    return Result(n, (timer.t1 - timer.t0) * n / (n - 1), wall)


# -- a hand-written loop --------------------------------------------------------------------


def run_plain(scenario: str, n: int, out: str) -> Result:
    import torch

    _, make, inline = SCENARIOS[scenario]
    model = torch.nn.Linear(WIDTH, WIDTH)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.randn(n, WIDTH)

    def step(i: int) -> Any:
        _wait()
        opt.zero_grad()
        loss = model(data[i]).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    gc.collect()
    t0 = time.perf_counter()
    if make is None:
        start = time.perf_counter()
        for i in range(n):
            step(i)
            if inline:
                time.sleep(CB_S)
        end = time.perf_counter()
        return Result(n, end - start, end - t0)
    with ev.Session(make(), output_dir=out, num_steps=n) as session:
        start = time.perf_counter()
        for i in range(n):
            session.step_ended(i, {"loss": step(i)})
            if session.should_stop:
                break
        end = time.perf_counter()
    wall = time.perf_counter() - t0

    class Done:
        artifacts = session.artifacts

    check(Done, n)
    return Result(n, end - start, wall)


# -- the run --------------------------------------------------------------------------------

FRAMEWORKS = {
    "lightning": ("Lightning", run_lightning, ("torch", "lightning")),
    "hf": ("HF Trainer", run_hf, ("torch", "transformers", "accelerate")),
    "plain": ("torch loop", run_plain, ("torch",)),
}


def available() -> dict[str, bool]:
    import importlib.util

    return {
        key: all(importlib.util.find_spec(m) is not None for m in mods)
        for key, (_, _, mods) in FRAMEWORKS.items()
    }


def main() -> None:
    global STEP_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median of these)")
    ap.add_argument("--steps", type=int, default=300, help="steps per run")
    ap.add_argument("--inline-steps", type=int, default=25, help="steps for inline 20 ms runs")
    ap.add_argument(
        "--wait-ms",
        type=float,
        default=STEP_S * 1e3,
        help="sleep in each step beside the tiny model (0: the model alone, never waiting)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke: 1 round, few steps")
    args = ap.parse_args()
    if args.wait_ms < 0:
        ap.error(f"--wait-ms must be >= 0, got {args.wait_ms:g}")
    STEP_S = args.wait_ms / 1e3
    if args.quick:
        args.repeats, args.steps, args.inline_steps = 1, 12, 4
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)  # a tiny model: torch's own threads would only contend
    for name in ("lightning", "lightning.pytorch", "transformers", "evsys_async"):
        logging.getLogger(name).setLevel(logging.ERROR)
    have = available()
    todo = [(f, s) for f in FRAMEWORKS if have[f] for s in SCENARIOS]
    results: dict[tuple[str, str], list[Result]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evsys-bench-bridges-") as tmp:
        for rnd in range(args.repeats):
            shift = (rnd * 5) % len(todo)
            for fw, sc in todo[shift:] + todo[:shift]:
                n = args.inline_steps if sc == "inline" else args.steps
                with contextlib.redirect_stderr(None), contextlib.redirect_stdout(None):
                    res = FRAMEWORKS[fw][1](sc, n, tmp)
                results.setdefault((fw, sc), []).append(res)
    report(args, have, results, time.perf_counter() - started)


def report(
    args: argparse.Namespace,
    have: dict[str, bool],
    results: dict[tuple[str, str], list[Result]],
    wall: float,
) -> None:
    print(f"bench_bridges: {machine()}")
    print(
        f"command: python benchmarks/bench_bridges.py {' '.join(sys.argv[1:])}".rstrip()
        + f"   ({args.repeats} interleaved rounds, {args.steps} steps per run, "
        f"{args.inline_steps} for inline 20 ms; step = tiny model + {STEP_S * 1e3:g} ms; "
        f"{wall:.0f} s)"
    )
    missing = [FRAMEWORKS[f][0] for f, ok in have.items() if not ok]
    if missing:
        names = ", ".join(missing)
        print(f"skipped (not installed): {names}; pip install -e '.[test-integrations]'")
    headers = ["trainer", "scenario", "steps/s", "spread", "x bare", "µs/step vs bare", "fit s"]
    rows: list[list[str]] = []
    for fw, (label, _, _) in FRAMEWORKS.items():
        bares = results.get((fw, "bare"))
        if not bares:
            continue
        for sc, (sc_label, _, _) in SCENARIOS.items():
            runs = results[(fw, sc)]
            ratio = [r.steps_per_s / b.steps_per_s for r, b in zip(runs, bares, strict=True)]
            over = [
                (r.train_s / r.steps - b.train_s / b.steps) * 1e6
                for r, b in zip(runs, bares, strict=True)
            ]
            sps = [r.steps_per_s for r in runs]
            rows.append(
                [
                    label,
                    sc_label,
                    fmt(med(sps)),
                    spread(sps),
                    fmt(med(ratio), 3),
                    fmt(med(over), 0),
                    fmt(med([r.wall_s for r in runs])),
                ]
            )
    print_table(headers, rows)


if __name__ == "__main__":
    run_main(main)
