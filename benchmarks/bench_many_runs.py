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
Target: every run keeps >= 0.95 of its solo steps/s. Then all four together
again, each also given a callback that raises on every event (a logger whose
server is down): each run's steps/s against its solo one, its
``drain_seconds`` and whether anything was reported stuck. Target: every run
drains well inside its deadline with nothing stuck. Every callback counts its
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

from _common import check_count, machine, med, print_table, run_main, spread, verdict

import evsys_async as ev

STEP_S, SLOW_S, RUNS = 0.002, 0.02, 4


class Noop(ev.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.n += 1


class Failing(Noop):
    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.n += 1
        raise ConnectionError("logging server down")


class Slow(Noop):
    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        time.sleep(SLOW_S)
        self.n += 1


async def step(state: Any, step_idx: int) -> dict[str, float]:
    await anyio.sleep(STEP_S)
    return {"loss": 1.0 / (step_idx + 1)}


async def one(
    bus: ev.EventBus, key: str, extra: type[Noop] | None, n: int, tmp: Path, out: dict[str, Any]
) -> None:
    cbs: list[Noop] = [Noop(), *([extra()] if extra is not None else [])]
    loop = ev.TrainingLoop(
        step, num_steps=n, output_dir=tmp, run_key=key, overwrite=True, bus=bus, callbacks=cbs
    )
    art = await loop.run()
    for cb in cbs:
        check_count(f"{key} {type(cb).__name__}", cb.n, n)
    report = art.callback_report
    if extra is Failing:
        # on one bus names are unique: Failing, Failing#2, ...
        [failing] = [h for name, h in report.items() if name.startswith("Failing")]
        check_count(f"{key} failed", failing.failed, n)
    out[key] = n / art.train_seconds
    out[f"{key} drain"] = art.drain_seconds
    out[f"{key} stuck"] = sum(1 for h in report.values() if h.stuck or h.pending)


def extra_of(label: str, r: int) -> type[Noop] | None:
    if label == "slow":
        return Slow if r == 0 else None
    return Failing if label == "failing" else None


async def round_(n: int, tmp: Path, results: dict[str, list[float]]) -> None:
    async with ev.EventBus() as bus:
        for r in range(RUNS):  # each run alone first
            solo: dict[str, float] = {}
            await one(bus, f"solo{r}", None, n, tmp, solo)
            results.setdefault(f"run{r} solo", []).append(solo[f"solo{r}"])
        for label in ("plain", "slow", "failing"):
            together: dict[str, Any] = {}
            async with anyio.create_task_group() as tg:
                for r in range(RUNS):
                    tg.start_soon(one, bus, f"run{r}", extra_of(label, r), n, tmp, together)
            for r in range(RUNS):
                results.setdefault(f"run{r} {label}", []).append(together[f"run{r}"])
                for what in ("drain", "stuck"):
                    key = f"run{r} {label} {what}"
                    results.setdefault(key, []).append(together[f"run{r} {what}"])


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
    said = verdict(worst >= 0.95, "every run >= 0.95 of its solo steps/s")
    print(
        f"target: every run >= 0.95 of its solo steps/s with the slow run: worst {worst:.3f} ({said})"
    )
    print(f"what the slow run costs the others (together, with vs without it): at most {cost:.1%}")
    failing_table(res)


def failing_table(res: dict[str, list[float]]) -> None:
    rows, stuck, drain = [], 0.0, 0.0
    for r in range(RUNS):
        solo, plain, failing = (res[f"run{r} {k}"] for k in ("solo", "plain", "failing"))
        drains = res[f"run{r} failing drain"]
        stuck += sum(res[f"run{r} failing stuck"])
        drain = max(drain, max(drains))
        rows.append(
            [
                f"run{r}",
                f"{med(failing):.0f} ({med([t / s for t, s in zip(failing, solo, strict=True)]):.3f})",
                f"{med([t / p for t, p in zip(failing, plain, strict=True)]):.3f}",
                f"{med(drains) * 1e3:.1f} / {max(drains) * 1e3:.1f}",
            ]
        )
    print_table(
        [
            "run",
            "4 together, each + a callback failing on every event (x solo)",
            "x 4 together without it",
            "drain ms, median / worst",
        ],
        rows,
        title="four runs, each with a callback that raises on every event",
    )
    said = verdict(stuck == 0, "every run drains with nothing stuck or pending")
    print(
        f"target: every run drains with nothing stuck or pending: worst drain {drain * 1e3:.1f} ms,"
        f" {stuck:.0f} callbacks reported stuck or pending ({said})"
    )


if __name__ == "__main__":
    run_main(main)
