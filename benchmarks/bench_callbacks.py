"""Per-event cost of each built-in callback, beside a counting no-op baseline.

Each case subscribes one callback on a real bus (through ``CallbackAdapter``,
as the loop does), waits until its ``setup`` has run, then times publishing
N ``StepEnded`` events (an ``EvalEnded`` every 100 steps) plus the drain that
sees each one handled. Files go to a temp dir; ``teardown`` (closing files,
``wandb.finish``) is outside the timing. Cases are interleaved round by round
and the table gives medians over ``--rounds`` (>= 7) with the spread.

    python benchmarks/bench_callbacks.py [--events 20000] [--rounds 7] [--backend asyncio|trio]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

import evsys_async as ev
from evsys_async.callbacks._adapter import CallbackAdapter
from evsys_async.callbacks.csv_metrics import CsvMetricsCallback
from evsys_async.callbacks.debug_logger import DebugLoggerCallback
from evsys_async.callbacks.early_stopping import EarlyStoppingCallback
from evsys_async.callbacks.evsys_logger import EvsysLoggerCallback
from evsys_async.callbacks.local_logger import LocalLoggerCallback
from evsys_async.callbacks.mlflow_logger import MlflowLoggerCallback
from evsys_async.callbacks.print_progress import PrintProgressCallback
from evsys_async.callbacks.tensorboard_logger import TensorBoardLoggerCallback
from evsys_async.callbacks.wandb_logger import WandbLoggerCallback
from evsys_async.events import EvalEnded, Event, StepEnded

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_main


class NoOp(ev.Callback):
    """The baseline: a def hook that only counts (and the count is checked)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.calls += 1

    def on_eval(self, state: Any, step_idx: int, eval_name: str, metrics: Any) -> None:
        self.calls += 1


CASES: dict[str, Callable[[], ev.Callback]] = {
    "no-op (def, counting)": NoOp,
    "print_progress (file, every=1)": lambda: PrintProgressCallback(stream=io.StringIO()),
    "csv_metrics": lambda: CsvMetricsCallback("metrics.csv"),
    "early_stopping (evals only)": lambda: EarlyStoppingCallback("acc", patience=10**9),
    "local_logger (jsonl x2)": lambda: LocalLoggerCallback(print_every=0),
    "debug_logger (DEBUG off)": DebugLoggerCallback,
    "tensorboard_logger": TensorBoardLoggerCallback,
    "wandb_logger (offline)": lambda: WandbLoggerCallback(mode="offline"),
    "evsys_logger (local store)": EvsysLoggerCallback,
    "mlflow (SQLite; the hooks, not the sender)": MlflowLoggerCallback,
}


def events(n: int) -> list[Event]:
    out: list[Event] = []
    for i in range(n):
        out.append(StepEnded(step=i, num_steps=n, metrics={"loss": 1.0 / (i + 1), "lr": 1e-4}))
        if i % 100 == 99:
            out.append(EvalEnded(step=i, eval_name="val", metrics={"acc": i / n}))
    return out


async def one(make: Callable[[], ev.Callback], evs: list[Event], root: Path) -> float:
    """Seconds to publish ``evs`` and see every one handled (after setup)."""
    cb = make()
    out = Path(tempfile.mkdtemp(dir=root))
    ctx = ev.LogContext(output_dir=out, run_key="bench")
    state = ev.LoopState(num_steps=len(evs), output_dir=out, ctx=ctx)
    async with ev.EventBus() as bus:
        adapter = CallbackAdapter(cb, state)
        sub = adapter.subscribe(bus)
        first = evs[0]
        # setup runs before the first event: wait for it outside the timing
        await bus.publish_and_wait(
            EvalEnded(step=-1, eval_name="warmup", metrics={})
            if adapter.handles(EvalEnded)
            else first,
            timeout=60,
        )
        t0 = time.perf_counter()
        for e in evs:
            bus.publish(e)
        report = await bus.drain(timeout=300)
        elapsed = time.perf_counter() - t0
        assert report.ok, report
        stats = sub.stats()
        assert stats.failed == 0, (type(cb).__name__, stats, sub.last_error)
        await sub.aclose(60)
    if isinstance(cb, NoOp):
        expected = len(evs) + 1
        assert cb.calls == expected, f"no-op counted {cb.calls} calls, expected {expected}"
    return elapsed


async def main_async(n: int, rounds: int) -> dict[str, list[float]]:
    evs = events(n)
    results: dict[str, list[float]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("WANDB_DIR", str(root))
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_MODE", "offline")
        for _ in range(rounds):  # interleaved: every case once per round
            for name, make in CASES.items():
                results[name].append(await one(make, evs, root))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    if args.rounds < 7:
        sys.exit("--rounds must be >= 7 (medians of at least 7: docs/performance.md)")
    results = anyio.run(main_async, args.events, args.rounds, backend=args.backend)
    n_events = len(events(args.events))
    base = statistics.median(results["no-op (def, counting)"]) / n_events * 1e6
    print(
        f"backend={args.backend} events={n_events} rounds={args.rounds} python={sys.version.split()[0]}"
    )
    print(f"{'callback':34} {'µs/event':>9} {'min..max':>15} {'over no-op':>11}")
    for name, times in results.items():
        per = [t / n_events * 1e6 for t in times]
        med = statistics.median(per)
        spread = f"{min(per):.2f}..{max(per):.2f}"
        print(f"{name:34} {med:9.2f} {spread:>15} {med - base:+11.2f}")


if __name__ == "__main__":
    run_main(main)
