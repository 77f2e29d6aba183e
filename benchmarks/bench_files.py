"""def vs async file writes for a JSONL logger : which the built-ins use.

Three loggers, identical but for how they write, each one subscriber on a
real bus: ``def`` hooks writing with plain file I/O in the callback's own
thread, once per delivered batch; ``async def`` hooks writing through
``evsys_async._util.files`` (aiofiles on asyncio, ``anyio.open_file`` on trio),
once per batch; and the same async logger writing once per event. Each case
times publishing N ``StepEnded`` plus the drain that sees them handled
(after ``setup``, before ``teardown``), checks the line count of the file,
and the table gives medians over interleaved rounds (>= 7) with the spread.

    python benchmarks/bench_files.py [--events 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import anyio
import msgspec

import evsys_async as ev
from evsys_async._util.files import AsyncFile, open_async
from evsys_async.callbacks._adapter import CallbackAdapter
from evsys_async.events import StepEnded

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_main

_encode = msgspec.json.Encoder().encode


class DefJsonl(ev.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[bytes] = []
        self.f: IO[bytes] | None = None

    def setup(self, state: Any) -> None:
        self.f = open(self.path, "wb")  # noqa: SIM115

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.lines.append(_encode({"step": step_idx, "metrics": metrics}))

    def flush(self) -> None:
        if self.lines and self.f is not None:
            self.f.write(b"\n".join(self.lines) + b"\n")
            self.f.flush()
            self.lines = []

    def teardown(self, state: Any) -> None:
        if self.f is not None:
            self.f.close()


class AsyncJsonl(ev.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[bytes] = []
        self.f: AsyncFile | None = None

    async def setup(self, state: Any) -> None:
        self.f = await open_async(self.path, "wb")

    async def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.lines.append(_encode({"step": step_idx, "metrics": metrics}))

    async def flush(self) -> None:
        if self.lines and self.f is not None:
            data, self.lines = b"\n".join(self.lines) + b"\n", []
            await self.f.write(data)
            await self.f.flush()

    async def teardown(self, state: Any) -> None:
        if self.f is not None:
            await self.f.aclose()


class AsyncJsonlPerEvent(AsyncJsonl):
    async def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        assert self.f is not None
        await self.f.write(_encode({"step": step_idx, "metrics": metrics}) + b"\n")

    async def flush(self) -> None:
        if self.f is not None:
            await self.f.flush()


CASES: dict[str, Callable[[Path], ev.Callback]] = {
    "def, plain write per batch": DefJsonl,
    "async, _files write per batch": AsyncJsonl,
    "async, _files write per event": AsyncJsonlPerEvent,
}


async def one(make: Callable[[Path], ev.Callback], n: int, root: Path) -> float:
    path = Path(tempfile.mkdtemp(dir=root)) / "m.jsonl"
    cb = make(path)
    state = ev.LoopState(num_steps=n, output_dir=root)
    async with ev.EventBus() as bus:
        sub = CallbackAdapter(cb, state).subscribe(bus)
        await bus.publish_and_wait(StepEnded(step=-1, num_steps=n, metrics={}), timeout=30)
        t0 = time.perf_counter()
        for i in range(n):
            bus.publish(StepEnded(step=i, num_steps=n, metrics={"loss": 1.0 / (i + 1)}))
        report = await bus.drain(timeout=300)
        elapsed = time.perf_counter() - t0
        assert report.ok, report
        assert sub.stats().failed == 0, sub.last_error
        await sub.aclose(30)
    lines = path.read_bytes().count(b"\n")
    assert lines == n + 1, f"{type(cb).__name__} wrote {lines} lines, expected {n + 1}"
    return elapsed


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def in_loop(make: Callable[[Path], ev.Callback] | None, n: int, root: Path) -> float:
    """Wall seconds of ``n`` steps of an async step spinning 50 µs of CPU (what training
    does on the loop thread), with the logger subscribed (or bare: ``make=None``),
    shutdown excluded: what the logger costs the loop itself."""
    path = Path(tempfile.mkdtemp(dir=root)) / "m.jsonl"
    callbacks = [make(path)] if make is not None else []

    async def step(state: Any, i: int) -> dict[str, float]:
        _spin(50e-6)
        return {"loss": 1.0 / (i + 1)}

    loop = ev.TrainingLoop(step, num_steps=n, output_dir=root / "loop", callbacks=callbacks)
    artifacts = await loop.run()
    if make is not None:
        lines = path.read_bytes().count(b"\n")
        assert lines == n, f"wrote {lines} lines, expected {n}"
    return artifacts.train_seconds


async def run_backend(n: int, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    results: dict[str, list[float]] = {name: [] for name in CASES}
    loop_results: dict[str, list[float]] = {"bare loop": [], **{name: [] for name in CASES}}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for name, make in CASES.items():
                results[name].append(await one(make, n, Path(tmp)))
            loop_results["bare loop"].append(await in_loop(None, n // 4, Path(tmp)))
            for name, make in CASES.items():
                loop_results[name].append(await in_loop(make, n // 4, Path(tmp)))
    return results, loop_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.rounds < 7:
        sys.exit("--rounds must be >= 7 (medians of at least 7: docs/performance.md)")
    print(f"events={args.events} rounds={args.rounds} python={sys.version.split()[0]}")
    print(f"{'backend':8} {'logger':32} {'µs/event':>9} {'min..max':>15} {'vs def':>7}")
    loops = {}
    for backend in ("asyncio", "trio"):
        results, loops[backend] = anyio.run(run_backend, args.events, args.rounds, backend=backend)
        base = statistics.median(results["def, plain write per batch"])
        for name, times in results.items():
            per = [t / args.events * 1e6 for t in times]
            ratio = statistics.median(times) / base
            spread = f"{min(per):.2f}..{max(per):.2f}"
            print(f"{backend:8} {name:32} {statistics.median(per):9.2f} {spread:>15} {ratio:6.2f}x")
    steps = args.events // 4
    print()
    print(f"cost to the loop: {steps} steps of a 50 µs CPU step, train_seconds per step")
    print(f"{'backend':8} {'logger':32} {'µs/step':>9} {'min..max':>15} {'over bare':>10}")
    for backend, res in loops.items():
        bare = statistics.median(res["bare loop"]) / steps * 1e6
        for name, times in res.items():
            per = [t / steps * 1e6 for t in times]
            med = statistics.median(per)
            spread = f"{min(per):.1f}..{max(per):.1f}"
            print(f"{backend:8} {name:32} {med:9.1f} {spread:>15} {med - bare:+10.1f}")


if __name__ == "__main__":
    run_main(main)
