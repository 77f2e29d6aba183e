"""Callbacks in their own process (``isolation="process"``) against threads.

    python benchmarks/bench_process.py [--repeats 7] [--steps 200] [--only steps,cost,...]

Sections (each interleaved: every round runs every scenario once; medians of
``--repeats`` rounds with the spread beside them; baselines in the same run):

* ``steps`` — steps/s x bare of a 2 ms step (``async``: ``await anyio.sleep``, a
  GPU-like step; ``def``: a 2 ms pure-Python loop) with one callback whose
  ``on_step_end`` computes for 20 ms in pure Python, in a thread and in a
  process, ``Lossless`` and ``Latest``; and one that sleeps 20 ms in a thread.
  ``train_seconds`` is the measure (the drain of a lagging Lossless callback is
  after it and printed beside), and the rate over the second half of the steps
  (after a process's start-up, which competes for the CPU at the start of a
  short run).
* ``cost`` — CPU of this process (the loop's thread and the subscriber's feeder
  thread) per event published to a no-op subscriber in a process, in bursts of
  16 with a 1 ms pause after each (a step: each burst goes as one batch and is
  collected lazily, as in a run), minus the same publishing with no
  subscriber; the loop thread's own share beside it; the same for a thread
  subscriber.
* ``throughput`` — events/s a child's no-op ``def`` handler keeps up with.
* ``startup`` — subscribe to first-event-ready for a no-op handler: spawn, and
  forkserver (the first start includes the server's).
* ``builtins`` — each built-in's cost to a 2 ms CPU-bound ``def`` step, in its
  thread and in its process (steps/s x bare over the second half of the run,
  after the process's start-up; and over the whole run).

No-op handlers count their calls, and each count is checked before anything is
printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_count, fmt, machine, med, print_table, run_main, spread

import evsys_async as ev
from evsys_async.events import StepEnded

STEP = 0.002
CB = 0.020
PAUSE = 0.001  # between two bursts in the cost section


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def async_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    await anyio.sleep(STEP)
    return {"loss": 1.0 / (step_idx + 1), "t": time.perf_counter()}


def def_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    spin(STEP)
    return {"loss": 1.0 / (step_idx + 1), "t": time.perf_counter()}


class Compute(ev.Callback):
    """20 ms of pure Python per step."""

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        spin(CB)


class ComputeLatest(Compute):
    policy = ev.Latest()


class Sleeps(ev.Callback):
    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        time.sleep(CB)


def in_process(cb: ev.Callback) -> ev.Callback:
    cb.isolation = "process"
    return cb


#: calls of every Noop in this process (a child reports its own through noop_count)
_CALLS = 0


class Noop:
    """A no-op ``def`` handler that counts its calls, in whichever process it runs."""

    def __call__(self, event: StepEnded) -> None:
        global _CALLS
        _CALLS += 1


def noop_count() -> int:
    """The calls counted in this process (a child's, through ``Subscription.call``)."""
    return _CALLS


# -- steps --------------------------------------------------------------------------


class Clock(ev.Callback):
    """Keeps each ``StepEnded``'s timestamp (an async hook: cheap, on the loop)."""

    def __init__(self) -> None:
        self.ts: list[float] = []

    async def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.ts.append(metrics["t"])


def steady_rate(clock: Clock) -> float:
    """Steps/s over the second half of the run: after any process's start-up."""
    ts = clock.ts
    half = len(ts) // 2
    return (len(ts) - 1 - half) / (ts[-1] - ts[half])


STEP_SCENARIOS: list[tuple[str, Callable[[], list[ev.Callback]]]] = [
    ("bare", list),
    ("20 ms sleep, thread", lambda: [Sleeps()]),
    ("20 ms compute, thread, Lossless", lambda: [Compute()]),
    ("20 ms compute, thread, Latest", lambda: [ComputeLatest()]),
    ("20 ms compute, process, Lossless", lambda: [in_process(Compute())]),
    ("20 ms compute, process, Latest", lambda: [in_process(ComputeLatest())]),
]


async def one_run(
    step: Any, callbacks: list[ev.Callback], n: int, tmp: Path
) -> tuple[float, float, ev.LoopArtifacts]:
    loop = ev.TrainingLoop(
        step, num_steps=n, output_dir=tmp, callbacks=callbacks, drain_timeout=600
    )
    a = await loop.run()
    if a.status != "completed" or a.steps_completed != n:
        raise AssertionError(f"run did not complete: {a.status} {a.steps_completed}")
    for name, h in a.callback_report.items():
        if h.failed or h.pending or h.stuck or h.dropped != h.coalesced or h.delivered < 1:
            raise AssertionError(f"{name}: {h}")
    return n / a.train_seconds, a.drain_seconds, a


async def bench_steps(args: argparse.Namespace, tmp: Path) -> None:
    for kind, step in (("async", async_step), ("def", def_step)):
        rates: dict[str, list[float]] = {name: [] for name, _ in STEP_SCENARIOS}
        steady: dict[str, list[float]] = {name: [] for name, _ in STEP_SCENARIOS}
        drains: dict[str, list[float]] = {name: [] for name, _ in STEP_SCENARIOS}
        for _ in range(args.repeats):
            for name, make in STEP_SCENARIOS:
                clock = Clock()
                rate, drain, _a = await one_run(step, [*make(), clock], args.steps, tmp)
                rates[name].append(rate)
                steady[name].append(steady_rate(clock))
                drains[name].append(drain)
        bare, bare_steady = med(rates["bare"]), med(steady["bare"])
        rows = [
            [
                name,
                fmt(med(rates[name])),
                fmt(med(rates[name]) / bare),
                spread(rates[name]),
                fmt(med(steady[name]) / bare_steady),
                spread(steady[name]),
                fmt(med(drains[name])),
            ]
            for name, _ in STEP_SCENARIOS
        ]
        print_table(
            ["scenario", "steps/s", "x bare", "spread", "x bare, 2nd half", "spread", "drain s"],
            rows,
            f"2 ms {kind} step, {args.steps} steps, one callback ('2nd half': after a "
            "process's start-up)",
        )


# -- cost per event -----------------------------------------------------------------


async def publish_cost(isolation: str | None, n: int, batch: int) -> tuple[float, float]:
    """Parent-process CPU and loop-thread CPU per event (s)."""
    async with ev.EventBus(batch_size=max(1, batch // 4), close_timeout=600) as bus:
        sub = None
        before = 0
        if isolation is not None:
            sub = bus.subscribe(Noop(), events=(StepEnded,), isolation=isolation)  # type: ignore[arg-type]
            if isolation == "process":
                while sub.stats().startup_seconds == 0:  # the start is not what is measured
                    await anyio.sleep(0.01)
            before = await sub.call(noop_count)
        events = [StepEnded(step=i, num_steps=n, metrics={"loss": 0.5}) for i in range(n)]
        p0, t0 = time.process_time(), time.thread_time()
        for i in range(0, n, batch):
            for e in events[i : i + batch]:
                bus.publish(e)
            # a step's pause: the burst goes as one batch, collected lazily (as in a run)
            await anyio.sleep(PAUSE)
        report = await bus.drain(600)
        p1, t1 = time.process_time(), time.thread_time()
        assert report.ok
        if sub is not None:
            check_count(f"{isolation} no-op", await sub.call(noop_count) - before, n)
    return (p1 - p0) / n, (t1 - t0) / n


async def bench_cost(args: argparse.Namespace) -> None:
    n, batch = 20_000, 16
    cases = [("no subscriber", None), ("thread subscriber", "thread"), ("process", "process")]
    proc: dict[str, list[float]] = {c: [] for c, _ in cases}
    loop: dict[str, list[float]] = {c: [] for c, _ in cases}
    for _ in range(args.repeats):
        for name, iso in cases:
            p, t = await publish_cost(iso, n, batch)
            proc[name].append(p)
            loop[name].append(t)
    base_p, base_t = med(proc["no subscriber"]), med(loop["no subscriber"])
    rows = [
        [
            name,
            fmt(med(proc[name]) * 1e6),
            fmt((med(proc[name]) - base_p) * 1e6),
            spread(proc[name]),
            fmt((med(loop[name]) - base_t) * 1e6),
        ]
        for name, _ in cases
    ]
    print_table(
        ["subscriber", "µs CPU/event", "µs over none", "spread", "loop thread µs over none"],
        rows,
        f"this process's CPU per event published, {n} events in bursts of {batch}",
    )


# -- the child's throughput ----------------------------------------------------------


async def child_rate(n: int) -> float:
    async with ev.EventBus(close_timeout=600) as bus:
        sub = bus.subscribe(Noop(), events=(StepEnded,), isolation="process")
        while sub.stats().startup_seconds == 0:
            await anyio.sleep(0.01)
        before = await sub.call(noop_count)
        events = [StepEnded(step=i, num_steps=n, metrics={"loss": 0.5}) for i in range(n)]
        t0 = time.perf_counter()
        for i, e in enumerate(events):
            bus.publish(e)
            if i % 256 == 0:
                await anyio.lowlevel.checkpoint()
        assert (await bus.drain(600)).ok
        elapsed = time.perf_counter() - t0
        check_count("child no-op", await sub.call(noop_count) - before, n)
    return n / elapsed


async def bench_throughput(args: argparse.Namespace) -> None:
    rates = [await child_rate(50_000) for _ in range(args.repeats)]
    print_table(
        ["handler", "events/s", "spread"],
        [["no-op def, in a process", fmt(med(rates)), spread(rates)]],
        "a child's throughput (50,000 events published as fast as the loop can)",
    )


# -- start-up -----------------------------------------------------------------------


async def startup(method: str) -> float:
    os.environ["EVSYS_START_METHOD"] = method
    try:
        async with ev.EventBus(close_timeout=60) as bus:
            sub = bus.subscribe(Noop(), events=(StepEnded,), isolation="process")
            while sub.stats().startup_seconds == 0:
                await anyio.sleep(0.001)
            return sub.stats().startup_seconds
    finally:
        del os.environ["EVSYS_START_METHOD"]


async def bench_startup(args: argparse.Namespace) -> None:
    first_fs = await startup("forkserver")  # starts the server
    spawn: list[float] = []
    fs: list[float] = []
    for _ in range(args.repeats):
        spawn.append(await startup("spawn"))
        fs.append(await startup("forkserver"))
    rows = [
        ["spawn", fmt(med(spawn) * 1e3), spread(spawn)],
        ["forkserver, first of this run (starts the server, if not yet)", fmt(first_fs * 1e3), "-"],
        ["forkserver, later", fmt(med(fs) * 1e3), spread(fs)],
    ]
    print_table(["start method", "ms to ready", "spread"], rows, "start-up of a child")


# -- built-ins ----------------------------------------------------------------------


def builtin_specs(tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("print_progress", {"every": 1000}),  # the first and last step: keeps the output short
        ("csv_metrics", {"out_path": "metrics.csv"}),
        ("early_stopping", {"metric": "loss", "patience": 10**9}),
        ("local_logger", {"print_every": 0}),
        ("debug_logger", {}),
        ("tensorboard_logger", {}),
        ("wandb_logger", {"mode": "offline", "project": "bench"}),
        ("evsys_logger", {}),
    ]


async def bench_builtins(args: argparse.Namespace, tmp: Path) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", str(tmp))
    specs = builtin_specs(tmp)
    names = ["bare"] + [f"{k}, {iso}" for k, _ in specs for iso in ("thread", "process")]
    rates: dict[str, list[float]] = {n: [] for n in names}

    def make(name: str) -> list[ev.Callback]:
        if name == "bare":
            return []
        kind, iso = name.split(", ")
        params = dict(next(p for k, p in specs if k == kind))
        params = {k: v for k, v in params.items() if v is not None}
        [cb] = ev.build_callbacks([{"kind": kind, "params": params, "isolation": iso}])
        return [cb]

    steady: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            clock = Clock()
            try:
                rate, _d, _a = await one_run(def_step, [*make(name), clock], args.steps, tmp)
                steady[name].append(steady_rate(clock))
            except ev.errors.ConfigError as exc:  # not buildable here (a missing extra)
                print(f"skipped {name}: {exc}", file=sys.stderr)
                rate = float("nan")
                steady[name].append(rate)
            rates[name].append(rate)
    bare, bare_steady = med(rates["bare"]), med(steady["bare"])
    rows = []
    for kind, _ in specs:
        t, p = rates[f"{kind}, thread"], rates[f"{kind}, process"]
        ts, ps = steady[f"{kind}, thread"], steady[f"{kind}, process"]
        rows.append(
            [
                kind,
                fmt(med(ts) / bare_steady),
                spread(ts),
                fmt(med(ps) / bare_steady),
                spread(ps),
                fmt(med(t) / bare),
                fmt(med(p) / bare),
            ]
        )
    print_table(
        [
            "built-in",
            "thread x bare",
            "spread",
            "process x bare",
            "spread",
            "whole run: thread",
            "process",
        ],
        rows,
        f"each built-in's cost to a 2 ms CPU-bound def step ({args.steps} steps; x bare over "
        f"the second half, after start-up; 'whole run' includes the process's start)",
    )


SECTIONS = ("steps", "cost", "throughput", "startup", "builtins")


async def main(args: argparse.Namespace) -> None:
    print(f"{machine()}; backend {args.backend}; {args.repeats} interleaved rounds")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for section in args.only:
            if section == "steps":
                await bench_steps(args, tmp)
            elif section == "cost":
                await bench_cost(args)
            elif section == "throughput":
                await bench_throughput(args)
            elif section == "startup":
                await bench_startup(args)
            elif section == "builtins":
                await bench_builtins(args, tmp)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median of)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ns = ap.parse_args()
    ns.only = [s for s in ns.only.split(",") if s]
    for s in ns.only:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; pick from {', '.join(SECTIONS)}")
    run_main(lambda: anyio.run(main, ns, backend=ns.backend))
