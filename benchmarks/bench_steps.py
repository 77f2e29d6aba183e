"""Step-path cost: the def path at the cost of the async one, on an instant step.

Run: ``python benchmarks/bench_steps.py`` (about two minutes; ``--quick`` for a
smoke run, ``--backend trio``).

Rows, each against a baseline measured in the same run (rounds interleave
every scenario in a rotated order; figures are medians over the rounds, the
overhead the median of per-round differences with that round's baseline):

* ``def step`` — ``TrainingLoop`` with an instant ``def`` step, against a plain
  ``async`` for-loop that calls the same step and yields once per step.
  Target: <= 15 us/step over it.
* ``async step`` — the same with an instant ``async def`` step.
* ``16 def noop`` / ``16 async noop`` — 16 callbacks whose ``on_step_end`` only
  counts, on the instant async step, against the bare loop with that step.
  Target for ``def``: <= 15 us/step over bare.
* ``loggers, 1 ms step`` — ``csv_metrics``, ``local_logger`` and
  ``tensorboard_logger`` together on a step that ``await``\\ s 1 ms, against the
  bare loop with that step. Target: >= 0.98 of bare steps/s.
* ``1 def failing`` / ``1 async failing`` — one callback that raises on every
  ``StepEnded`` (a logging server that is down), on the instant async step,
  against one no-op callback of the same kind. Target: <= 15 us/step over it.
  Its log goes to a handler that drops it (the records are made, not shown).
* ``1 ms failing def`` / ``1 ms failing async`` — the same on the 1 ms step,
  against the bare loop. Target: >= 0.98 of bare steps/s.
* with ``--against PATH[,PATH...]``: ``async step``, ``16 async noop``, ``16 def
  noop`` and the four one-callback rows also run, in each round, in a child
  process with ``PATH`` (a checkout of another commit, e.g. the code before
  the isolation work) first on ``PYTHONPATH``; its rows are marked
  ``(PATH)``. Target: ``16 async noop`` no more over its bare loop than the
  code before the isolation work.
* ``drain`` — ``drain_seconds`` of 1,000 instant steps with 16 no-op ``def``
  callbacks, over ``--drains`` runs: median and worst (target: worst <= 5x
  the median).

Every callback counts its calls and the script checks the counts before it
prints. It asserts no timing. ``us/step`` is the whole step with callbacks;
``over us/step`` what they add to the baseline's, which is what each target
bounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_count, fmt, machine, med, print_table, run_main, spread, verdict
from bench_loop import AsyncNoop, SyncNoop  # the same counting no-op callbacks

import evsys_async as ev

N_NOOP = 16


def instant_def(state: Any, step_idx: int) -> dict[str, float]:
    return {"loss": 1.0 / (step_idx + 1)}


async def instant_async(state: Any, step_idx: int) -> dict[str, float]:
    return {"loss": 1.0 / (step_idx + 1)}


async def one_ms(state: Any, step_idx: int) -> dict[str, float]:
    await anyio.sleep(0.001)
    return {"loss": 1.0 / (step_idx + 1)}


class FailingDef(SyncNoop):
    """Counts its calls, then raises: a logger whose server is down."""

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.n += 1
        raise ConnectionError("logging server down")


class FailingAsync(AsyncNoop):
    async def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.n += 1
        raise ConnectionError("logging server down")


def loggers() -> list[Any]:
    from evsys_async.callbacks import (
        CsvMetricsCallback,
        LocalLoggerCallback,
        TensorBoardLoggerCallback,
    )

    return [
        CsvMetricsCallback("metrics.csv"),
        LocalLoggerCallback(print_every=0),
        TensorBoardLoggerCallback(),
    ]


async def plain(step: Callable[..., Any], n: int) -> float:
    """us/step of a plain async for-loop calling ``step`` and yielding once a step."""
    state = ev.LoopState(num_steps=n)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        out = step(state, i)
        if not isinstance(out, dict):
            out = await out
        await anyio.lowlevel.checkpoint()
    return (time.perf_counter() - t0) / n * 1e6


async def evsys(
    step: Callable[..., Any], callbacks: list[Any], n: int, tmp: Path
) -> ev.LoopArtifacts:
    options: dict[str, Any] = {"num_steps": n, "output_dir": tmp, "run_key": "b"}
    try:
        loop = ev.TrainingLoop(step, overwrite=True, callbacks=callbacks, **options)
    except TypeError:  # older code (--against) has no overwrite
        loop = ev.TrainingLoop(step, callbacks=callbacks, **options)
    gc.collect()
    art = await loop.run()
    if art.status != "completed" or art.steps_completed != n:
        raise AssertionError(f"run ended {art.status} after {art.steps_completed}/{n} steps")
    for cb in callbacks:
        if isinstance(cb, FailingDef | FailingAsync):
            check_count(type(cb).__name__, cb.n, n)
            [h] = [h for name, h in art.callback_report.items() if name.startswith("Failing")]
            check_count(f"{type(cb).__name__} failed", h.failed, n)
        elif hasattr(cb, "n"):
            check_count(type(cb).__name__, cb.n, n)
        else:  # a built-in logger: handled every event it was sent, lost none
            h = art.callback_report[cb.name]
            check_count(f"{cb.name} lost", h.failed + h.dropped + h.pending, 0)
            check_count(f"{cb.name} steps", min(h.delivered, n), n)
    return art


def us_per_step(art: ev.LoopArtifacts) -> float:
    return art.train_seconds / art.steps_completed * 1e6


def noops(cls: type, k: int) -> list[Any]:
    return [cls() for _ in range(k)]


def plan(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Callable[[], Any]]]:
    n, n_slow = args.steps, args.slow_steps
    return [
        ("plain def", lambda: plain(instant_def, n)),
        ("def step", lambda: evsys(instant_def, [], n, tmp)),
        ("plain async", lambda: plain(instant_async, n)),
        ("async step", lambda: evsys(instant_async, [], n, tmp)),
        ("16 def noop", lambda: evsys(instant_async, noops(SyncNoop, N_NOOP), n, tmp)),
        ("16 async noop", lambda: evsys(instant_async, noops(AsyncNoop, N_NOOP), n, tmp)),
        ("1 def noop", lambda: evsys(instant_async, [SyncNoop()], n, tmp)),
        ("1 def failing", lambda: evsys(instant_async, [FailingDef()], n, tmp)),
        ("1 async noop", lambda: evsys(instant_async, [AsyncNoop()], n, tmp)),
        ("1 async failing", lambda: evsys(instant_async, [FailingAsync()], n, tmp)),
        ("1 ms bare", lambda: evsys(one_ms, [], n_slow, tmp)),
        ("1 ms loggers", lambda: evsys(one_ms, loggers(), n_slow, tmp)),
        ("1 ms failing def", lambda: evsys(one_ms, [FailingDef()], n_slow, tmp)),
        ("1 ms failing async", lambda: evsys(one_ms, [FailingAsync()], n_slow, tmp)),
    ]


#: what ``--against`` runs in the other code, each round
AGAINST = (
    "async step",
    "16 async noop",
    "16 def noop",
    "1 def noop",
    "1 def failing",
    "1 async noop",
    "1 async failing",
)


async def worker(steps: int) -> dict[str, float]:
    """``--worker``: the ``AGAINST`` scenarios once, in whatever code is imported."""
    with tempfile.TemporaryDirectory(prefix="evsys-bench-against-") as tmp:
        todo = dict(plan(argparse.Namespace(steps=steps, slow_steps=0), Path(tmp)))
        return {key: us_per_step(await todo[key]()) for key in AGAINST}


def against(args: argparse.Namespace, path: str) -> dict[str, float]:
    """One round of the ``AGAINST`` scenarios in the code at ``path``."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps)]
    cmd += ["--backend", args.backend]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return {f"{k} ({path})": v for k, v in json.loads(out.stdout).items()}


async def rounds(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for rnd in range(args.repeats):
        todo = plan(args, tmp)
        for path in args.against.split(",") if args.against else ():
            todo.append((path, lambda p=path: anyio.to_thread.run_sync(against, args, p)))
        shift = rnd % len(todo)
        for key, thunk in todo[shift:] + todo[:shift]:
            res = await thunk()
            if isinstance(res, dict):  # the other code's round
                for k, v in res.items():
                    out.setdefault(k, []).append(v)
                continue
            out.setdefault(key, []).append(res if isinstance(res, float) else us_per_step(res))
    return out


async def drains(args: argparse.Namespace, tmp: Path) -> list[float]:
    out = []
    for _ in range(args.drains):
        art = await evsys(instant_async, [SyncNoop() for _ in range(N_NOOP)], 1000, tmp)
        out.append(art.drain_seconds * 1e3)
    return out


#: (scenario, baseline, target, the target's test on (over us/step, x base steps/s))
PAIRS: list[tuple[str, str, str, Callable[[float, float], bool] | None]] = [
    ("def step", "plain def", "over <= 15 us/step", lambda over, x: over <= 15),
    ("async step", "plain async", "", None),
    ("16 def noop", "async step", "over <= 15 us/step", lambda over, x: over <= 15),
    ("16 async noop", "async step", "over <= 10 us/step", lambda over, x: over <= 10),
    ("1 def failing", "1 def noop", "over <= 15 us/step", lambda over, x: over <= 15),
    ("1 async failing", "1 async noop", "over <= 15 us/step", lambda over, x: over <= 15),
    ("1 ms loggers", "1 ms bare", ">= 0.98 of bare", lambda over, x: x >= 0.98),
    ("1 ms failing def", "1 ms bare", ">= 0.98 of bare", lambda over, x: x >= 0.98),
    ("1 ms failing async", "1 ms bare", ">= 0.98 of bare", lambda over, x: x >= 0.98),
]


def table(res: dict[str, list[float]], against: str | None) -> list[list[str]]:
    pairs = list(PAIRS)
    for path in against.split(",") if against else ():
        base = f"async step ({path})"
        pairs += [
            (f"16 async noop ({path})", base, "", None),
            (f"16 def noop ({path})", base, "", None),
            (f"1 def failing ({path})", f"1 def noop ({path})", "", None),
            (f"1 async failing ({path})", f"1 async noop ({path})", "", None),
        ]
    rows = []
    for key, base, target, met in pairs:
        over = med([a - b for a, b in zip(res[key], res[base], strict=True)])
        ratio = med([b / a for a, b in zip(res[key], res[base], strict=True)])
        said = "" if met is None else "  " + verdict(met(over, ratio), key, words=("met", "MISSED"))
        rows.append(
            [
                key,
                base,
                fmt(med(res[key])),
                spread(res[key]),
                fmt(med(res[base])),
                fmt(over),
                f"{ratio:.3f}",
                target + said,
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds (median of these)")
    ap.add_argument("--steps", type=int, default=3000, help="instant steps per run")
    ap.add_argument("--slow-steps", type=int, default=300, help="1 ms steps per run")
    ap.add_argument("--drains", type=int, default=60, help="runs for the drain figure")
    ap.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    ap.add_argument(
        "--against", metavar="PATH[,PATH]", help="also run some rows in these checkouts"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, few steps")
    args = ap.parse_args()
    # a failing callback's records are made as they would be, then dropped: a terminal's
    # speed is not what is measured
    logging.getLogger("evsys_async").addHandler(logging.NullHandler())
    logging.getLogger("evsys_async").propagate = False
    if args.worker:
        print(json.dumps(anyio.run(worker, args.steps, backend=args.backend)))
        return
    if args.quick:
        args.repeats, args.steps, args.slow_steps, args.drains = 1, 200, 20, 3
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evsys-bench-steps-") as tmp:
        res = anyio.run(rounds, args, Path(tmp), backend=args.backend)
        drain_ms = anyio.run(drains, args, Path(tmp), backend=args.backend)
    wall = time.perf_counter() - started

    print(f"bench_steps: {machine()}")
    print(
        f"command: python benchmarks/bench_steps.py {' '.join(sys.argv[1:])}".rstrip()
        + f"   (backend {args.backend}, {args.repeats} interleaved rounds, {args.steps} instant"
        f" / {args.slow_steps} 1 ms steps per run; {wall:.0f} s)"
    )
    print_table(
        [
            "scenario",
            "baseline",
            "us/step",
            "spread",
            "baseline us/step",
            "over us/step",
            "x base steps/s",
            "target",
        ],
        table(res, args.against),
    )
    drain_ms.sort()
    median = statistics.median(drain_ms)
    print(
        f"drain of 1000 instant steps with {N_NOOP} def noop callbacks, {len(drain_ms)} runs: "
        f"median {median:.2f} ms, worst {drain_ms[-1]:.2f} ms ({drain_ms[-1] / median:.1f}x the "
        f"median; target <= 5x: {verdict(drain_ms[-1] <= 5 * median, 'drain worst <= 5x median')})"
    )


if __name__ == "__main__":
    run_main(main)
