"""Replay speed: events.jsonl into a no-op callback, against plain msgspec decoding.

One event log of ~100k events (a header, TrainStarted, 100k StepEnded with
three metrics, an EvalEnded every 1000 steps, TrainEnded), written as
``local_logger`` writes it. Scenarios, interleaved in every round (the order
rotates), medians over the rounds with the spread:

* ``msgspec decode_lines`` — the baseline: the same bytes decoded by one
  ``msgspec.json.Decoder`` of the envelope with the tagged event union, one
  call per 256 KiB block, as the reader does; no file reads, no bus.
* ``EventLogReader`` — the reader alone, in the calling thread (file reads,
  blocks, line numbers).
* ``read_events`` — the async iterator: the reader in its daemon thread, the
  envelopes handed to the loop.
* ``replay -> no-op def`` / ``replay -> no-op async`` — ``ev.replay`` into one
  callback whose ``on_event`` (a ``def`` in its own thread, or an ``async def``
  task) counts the events: decode, bus and delivery end to end. The count is
  checked before anything is printed.

    python benchmarks/bench_replay.py [--events 100000] [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

import evsys_async as ev
from evsys_async.events import Envelope, EvalEnded, StepEnded, TrainEnded, TrainStarted, encode
from evsys_async.transports.jsonl import EventLogReader, log_header

sys.path.insert(0, str(Path(__file__).parent))
from _common import check_count, fmt, machine, med, print_table, run_main, spread, verdict

TARGET = 200_000  # events/s, replay into a no-op callback
BLOCK = 256 * 1024


def write_log(path: Path, steps: int) -> int:
    """The log as a run writes it; returns the number of events."""
    bus = "5f0c3a2e9b1d4c7e8a6f0b2d4e6a8c0e"
    t0 = time.time()
    events: list[ev.Event] = [TrainStarted(num_steps=steps, run_key="bench", ts=t0)]
    for i in range(steps):
        metrics = {"loss": 1.0 / (i + 1), "lr": 3e-4, "grad_norm": 0.5 + i % 7}
        events.append(StepEnded(step=i, num_steps=steps, metrics=metrics, run_key="bench"))
        if (i + 1) % 1000 == 0:
            events.append(EvalEnded(step=i, eval_name="val", metrics={"acc": 0.5}, run_key="bench"))
    events.append(
        TrainEnded(status="completed", steps_completed=steps, num_steps=steps, run_key="bench")
    )
    lines = [log_header(run_key="bench")]
    lines += [encode(Envelope(bus, seq, event)) for seq, event in enumerate(events)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(events)


class NoopDef(ev.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_event(self, state: Any, event: Any) -> None:
        self.count += 1


class NoopAsync(ev.Callback):
    def __init__(self) -> None:
        self.count = 0

    async def on_event(self, state: Any, event: Any) -> None:
        self.count += 1


def baseline_decode(path: Path, n: int) -> float:
    """Seconds to decode the file's bytes with one typed msgspec decoder, block by block."""
    union: Any = None
    for cls in ev.events.event_types().values():
        union = cls if union is None else union | cls
    struct = msgspec.defstruct("Env", [("bus_id", str), ("seq", int), ("event", union)])
    decoder = msgspec.json.Decoder(struct, strict=False)
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1
    blocks, start = [], header_end
    while start < len(data):
        end = data.rfind(b"\n", start, start + BLOCK) + 1 or len(data)
        blocks.append(data[start:end])
        start = end
    t = time.perf_counter()
    got = 0
    for block in blocks:
        got += len(decoder.decode_lines(block))
    seconds = time.perf_counter() - t
    check_count("msgspec decode_lines", got, n)
    return seconds


def reader_alone(path: Path, n: int) -> float:
    t = time.perf_counter()
    reader = EventLogReader(path)
    got = sum(len(batch.envelopes) for batch in reader)
    reader.close()
    seconds = time.perf_counter() - t
    check_count("EventLogReader", got, n)
    return seconds


def read_events(path: Path, n: int, backend: str) -> float:
    async def main() -> float:
        t = time.perf_counter()
        got = 0
        async for _ in ev.read_events(path):
            got += 1
        seconds = time.perf_counter() - t
        check_count("read_events", got, n)
        return seconds

    return float(anyio.run(main, backend=backend))


def replay(path: Path, n: int, backend: str, cls: type, out: Path) -> float:
    async def main() -> float:
        cb = cls()
        t = time.perf_counter()
        report = await ev.replay(path, [cb], output_dir=out)
        seconds = time.perf_counter() - t
        check_count(f"replay -> {cls.__name__}", cb.count, n)
        check_count("replay published", report.events_published, n)
        return seconds

    return float(anyio.run(main, backend=backend))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="StepEnded events in the log")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="CI smoke: 10k events, 1 round")
    parser.add_argument(
        "--target",
        type=float,
        default=TARGET,
        help=f"events/s replay must reach (default {TARGET:,}); a miss prints FAIL, exit 1",
    )
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds = 10_000, 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.jsonl"
        n = write_log(path, args.events)
        out = Path(tmp) / "out"
        size = path.stat().st_size / 1e6
        print(f"machine: {machine()}")
        print(f"log: {n:,} events, {size:.1f} MB, {args.rounds} interleaved rounds")
        cases: dict[tuple[str, str], Callable[[], float]] = {
            ("msgspec decode_lines (baseline)", "-"): lambda: baseline_decode(path, n),
            ("EventLogReader", "-"): lambda: reader_alone(path, n),
        }
        for backend in ("asyncio", "trio"):
            cases[("read_events", backend)] = lambda b=backend: read_events(path, n, b)  # type: ignore[misc]
            for cls in (NoopDef, NoopAsync):
                label = f"replay -> no-op {'def' if cls is NoopDef else 'async'}"
                cases[(label, backend)] = lambda b=backend, c=cls: replay(path, n, b, c, out)  # type: ignore[misc]
        times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
        keys = list(cases)
        for r in range(args.rounds):
            shift = r % len(keys)
            for key in keys[shift:] + keys[:shift]:  # the order rotates each round
                times[key].append(cases[key]())
    base = med(times[keys[0]])
    rows = []
    for key in keys:
        m = med(times[key])
        rows.append(
            [
                key[0],
                key[1],
                f"{n / m:,.0f}",
                fmt(m / n * 1e6, 2),
                fmt(m / base, 2),
                spread([n / t for t in times[key]]),
            ]
        )
    print_table(
        ["scenario", "backend", "events/s", "µs/event", "x baseline time", "spread"],
        rows,
        title="replay (medians)",
    )
    print("\ntargets:")
    for backend in ("asyncio", "trio"):
        for kind in ("def", "async"):
            rate = n / med(times[(f"replay -> no-op {kind}", backend)])
            said = verdict(rate >= args.target, f"{backend} replay -> no-op {kind}")
            print(
                f"  {backend}: replay -> no-op {kind} = {rate:,.0f} events/s "
                f"(target >= {args.target:,.0f}: {said})"
            )


if __name__ == "__main__":
    run_main(main)
