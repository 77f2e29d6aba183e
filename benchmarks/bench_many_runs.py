"""Many runs in one process: does one slow run slow the others?

Run: ``python benchmarks/bench_many_runs.py`` (about a minute; ``--quick`` for a
smoke run, ``--backend trio``).

Four ``TrainingLoop`` runs of a 2 ms awaiting step share one event loop and
one ``EventBus`` (as in a service), each with its own run key, run dir and a
no-op callback: alone (one after the other), all four together, and all four
together with run 0 also given a callback that blocks 20 ms per event (in its
own thread). Each run's steps/s is compared with the same run alone measured
in the same round, median of the rounds; the last column separates what the
slow run costs the others from what sharing one event loop costs.
Target: every run keeps >= 0.95 of its solo steps/s. Every callback counts its
calls and the script checks the counts before it prints.
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

from _common import check_count, machine, med, print_table, spread

import evsys_async as ev

STEP_S, SLOW_S, RUNS = 0.002, 0.02, 4


class Noop(ev.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.n += 1


class Slow(Noop):
    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        time.sleep(SLOW_S)
        self.n += 1


async def step(state: Any, step_idx: int) -> dict[str, float]:
    await anyio.sleep(STEP_S)
    return {"loss": 1.0 / (step_idx + 1)}


async def one(
    bus: ev.EventBus, key: str, slow: bool, n: int, tmp: Path, out: dict[str, float]
) -> None:
    cbs: list[Noop] = [Noop(), *([Slow()] if slow else [])]
    loop = ev.TrainingLoop(
        step, num_steps=n, output_dir=tmp, run_key=key, overwrite=True, bus=bus, callbacks=cbs
    )
    art = await loop.run()
    for cb in cbs:
        check_count(f"{key} {type(cb).__name__}", cb.n, n)
    out[key] = n / art.train_seconds


async def round_(n: int, tmp: Path, results: dict[str, list[float]]) -> None:
    async with ev.EventBus() as bus:
        for r in range(RUNS):  # each run alone first
            solo: dict[str, float] = {}
            await one(bus, f"solo{r}", False, n, tmp, solo)
            results.setdefault(f"run{r} solo", []).append(solo[f"solo{r}"])
        for label, slow_one in (("plain", False), ("slow", True)):
            together: dict[str, float] = {}
            async with anyio.create_task_group() as tg:
                for r in range(RUNS):
                    tg.start_soon(one, bus, f"run{r}", slow_one and r == 0, n, tmp, together)
            for r in range(RUNS):
                results.setdefault(f"run{r} {label}", []).append(together[f"run{r}"])


async def main_async(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        await round_(args.steps, tmp, results)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="rounds (median of these)")
    ap.add_argument("--steps", type=int, default=150, help="steps per run")
    ap.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, few steps")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 20
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evsys-bench-runs-") as tmp:
        res = anyio.run(main_async, args, Path(tmp), backend=args.backend)
    print(f"bench_many_runs: {machine()}")
    print(
        f"command: python benchmarks/bench_many_runs.py {' '.join(sys.argv[1:])}".rstrip()
        + f"   (backend {args.backend}, {args.repeats} rounds, {args.steps} steps of"
        f" {STEP_S * 1e3:.0f} ms per run; {time.perf_counter() - started:.0f} s)"
    )
    rows, worst, cost = [], 1.0, 0.0
    for r in range(RUNS):
        solo, plain, slow = (res[f"run{r} {k}"] for k in ("solo", "plain", "slow"))
        x_plain = med([t / s for t, s in zip(plain, solo, strict=True)])
        x_slow = med([t / s for t, s in zip(slow, solo, strict=True)])
        x_rel = med([t / p for t, p in zip(slow, plain, strict=True)])
        worst = min(worst, x_slow)
        cost = max(cost, 1 - x_rel)
        rows.append(
            [
                f"run{r}" + (" (the 20 ms callback's run)" if r == 0 else ""),
                f"{med(solo):.0f}",
                f"{med(plain):.0f} ({x_plain:.3f})",
                f"{med(slow):.0f} ({x_slow:.3f})",
                spread(slow),
                f"{x_rel:.3f}",
            ]
        )
    print_table(
        [
            "run",
            "solo steps/s",
            "4 together (x solo)",
            "4 together, run0 + 20 ms cb (x solo)",
            "spread",
            "slow vs plain together",
        ],
        rows,
    )
    verdict = "PASS" if worst >= 0.95 else "FAIL"
    print(
        f"target: every run >= 0.95 of its solo steps/s with the slow run: worst {worst:.3f} ({verdict})"
    )
    print(f"what the slow run costs the others (together, with vs without it): at most {cost:.1%}")


if __name__ == "__main__":
    main()
