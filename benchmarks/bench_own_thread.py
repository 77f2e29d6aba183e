"""A run inside a busy service: on the service's event loop, or on one of its own.

Run: ``python benchmarks/bench_own_thread.py`` (a minute or two; ``--quick`` for a
smoke run, ``--backend trio``).

A ``TrainingLoop`` of 1 ms awaiting steps runs inside a "service": the event loop
that awaits it also runs a load. ``shared`` is ``await loop.run()`` (the run on the
service's loop), ``own`` is ``await loop.run(own_thread=True)`` (an event loop of its
own, in a thread the loop owns). The loads:

* ``idle``: nothing else;
* ``blocking``: a request handler that blocks the service's loop 5 ms at a time
  without holding the GIL (``time.sleep``: a blocking client call);
* ``tasks``: 200 tasks each woken every 10 ms (timers, polls, clients);
* ``cpu``: a handler that computes in pure Python 5 ms at a time (holds the GIL).

Each cell is the run's steps/s divided by ``shared idle`` measured in the same
round (interleaved), median of the rounds, with the spread. Target: ``own`` >= 0.95
of ``shared idle`` when the service's loop is idle or blocked (work that waits).
``tasks`` and ``cpu`` show the GIL's share: the run's thread, woken while the
service's thread runs Python, waits up to the switch interval (5 ms) for the GIL;
``--switch-interval`` sets ``sys.setswitchinterval`` for the process to show what a
shorter one buys. The step counts its calls and the script checks them before it
prints.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_count, machine, med, print_table, run_main, spread, verdict

import evsys_async as ev

STEP_S, BLOCK_S, TASKS, TICK_S = 0.001, 0.005, 200, 0.01
LOADS = ("idle", "blocking", "tasks", "cpu")
MODES = ("shared", "own")


async def _blocking() -> None:
    while True:
        time.sleep(BLOCK_S)  # a handler blocking the loop, the GIL released
        await anyio.lowlevel.checkpoint()


async def _ticking() -> None:
    while True:
        await anyio.sleep(TICK_S)  # a task woken every 10 ms: a timer, a poll, a client


async def _cpu() -> None:
    while True:
        until = time.perf_counter() + BLOCK_S
        while time.perf_counter() < until:  # pure Python: holds the GIL
            sum(range(100))
        await anyio.lowlevel.checkpoint()


async def one(load: str, mode: str, n: int, tmp: Path) -> float:
    calls = [0]

    async def step(state: Any, step_idx: int) -> dict[str, float]:
        calls[0] += 1
        await anyio.sleep(STEP_S)
        return {"loss": 1.0 / (step_idx + 1)}

    loop = ev.TrainingLoop(
        step, num_steps=n, output_dir=tmp, run_key=f"{load}-{mode}", overwrite=True
    )
    async with anyio.create_task_group() as tg:
        if load == "blocking":
            tg.start_soon(_blocking)
        elif load == "tasks":
            for _ in range(TASKS):
                tg.start_soon(_ticking)
        elif load == "cpu":
            tg.start_soon(_cpu)
        art = await loop.run(own_thread=mode == "own")
        tg.cancel_scope.cancel()
    check_count(f"{load} {mode} steps", calls[0], n)
    return n / art.train_seconds


async def main_async(args: argparse.Namespace, tmp: Path) -> dict[tuple[str, str], list[float]]:
    ratios: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        base = await one("idle", "shared", args.steps, tmp)
        for load in LOADS:
            for mode in MODES:
                rate = base if (load, mode) == ("idle", "shared") else None
                if rate is None:
                    rate = await one(load, mode, args.steps, tmp)
                ratios.setdefault((load, mode), []).append(rate / base)
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="rounds (median of these)")
    ap.add_argument("--steps", type=int, default=300, help="steps per run")
    ap.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, few steps")
    ap.add_argument("--switch-interval", type=float, default=None, help="seconds (default 0.005)")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.quick:
        args.repeats, args.steps = 1, 30
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evsys-bench-own-") as tmp:
        res = anyio.run(main_async, args, Path(tmp), backend=args.backend)
    print(f"bench_own_thread: {machine()}")
    print(
        f"command: python benchmarks/bench_own_thread.py {' '.join(sys.argv[1:])}".rstrip()
        + f"   (backend {args.backend}, {args.repeats} rounds, {args.steps} steps of"
        f" {STEP_S * 1e3:.0f} ms; {time.perf_counter() - started:.0f} s)"
    )
    rows = [
        [load, *(f"{med(res[load, m]):.3f} ({spread(res[load, m])})" for m in MODES)]
        for load in LOADS
    ]
    print_table(["load on the service's loop", "shared (x shared idle)", "own"], rows)
    worst = min(med(res[load, "own"]) for load in ("idle", "blocking"))
    said = verdict(worst >= 0.95, "own >= 0.95 of shared idle")
    print(f"switch interval: {sys.getswitchinterval() * 1e3:g} ms")
    print(f"target: own >= 0.95 of shared idle (idle, blocking): worst {worst:.3f} ({said})")


if __name__ == "__main__":
    run_main(main)
