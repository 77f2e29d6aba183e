"""Bus cost: publish, end-to-end delivery and the batching delay, against plain sync dispatch.

Run: ``python benchmarks/bench_bus.py`` (about a minute and a half; ``--quick`` for
a CI smoke run, ``--backends asyncio`` to skip trio).

One run prints one table. Every figure is a median over ``--repeats``
interleaved rounds (rounds alternate the backends; inside a round the
scenarios run in a rotated order), with the min/max spread beside it.

* ``sync 16 cb`` — the baseline: a plain loop calling ``on_step_end`` on 16
  no-op callback objects, as Lightning, Hugging Face and Keras dispatch
  (minus their per-hook bookkeeping, which only makes them slower).
* ``publish`` — the publisher's cost per ``bus.publish(event)`` of a prebuilt
  event, in a burst that never yields; ``build+publish`` also builds the
  ``StepEnded`` as the loop does (its metrics a fresh read-only mapping, so no
  callback can change what another sees); ``x sync16`` is build+publish over
  the baseline.
* ``burst e2e`` — publish N events, then ``await bus.drain()``: the whole
  time (publish, pump, wakes, every handler call) per event per subscriber.
* ``ring floor`` — what the burst costs without a bus: publishing writes each
  event into one preallocated ring (a list and a head index) and each
  subscriber then walks the ring calling its handler once per event
  (awaiting an ``async def`` one), in the publisher's thread, with no
  wake-ups, buffers, threads or counts; ``x ring`` is burst e2e over it, per
  event per subscriber, for the same handler kind and count. Target: <= 2.5x
  for 16 subscribers.
* ``lockstep`` — ``await bus.publish_and_wait(event)`` one event at a time
  (a barrier wakes the subscribers at once): latency per event.
* ``batching delay`` — publish one event on an idle loop and sleep: how long
  until the handler ran, without a barrier (``batch_delay`` plus timer slack).

Every handler counts its calls; the script checks each count before it
prints (a figure counts only if every call happened). It asserts no timing.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_count, fmt, machine, med, print_table, run_main, spread, verdict

from evsys_async import EventBus
from evsys_async.events import StepEnded
from evsys_async.events._frozen import FrozenDict

SUB_COUNTS = (1, 4, 16, 64)
LOCKSTEP_SUBS = (1, 16)
KINDS = ("async", "def")
CHUNKS = 5  # timed slices per burst for the publish cost


class AsyncNoop:
    """A no-op ``async def`` handler that counts its calls."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    async def on_event(self, event: Any) -> None:
        self.n += 1


class SyncNoop:
    """A no-op ``def`` handler (runs in the subscriber's thread) that counts its calls."""

    __slots__ = ("n", "t")

    def __init__(self) -> None:
        self.n = 0
        self.t = 0.0

    def on_event(self, event: Any) -> None:
        self.n += 1


class Stamp:
    """Records when it ran (perf_counter), for the batching-delay row."""

    def __init__(self) -> None:
        self.n = 0
        self.t = 0.0

    async def on_async(self, event: Any) -> None:
        self.t = time.perf_counter()
        self.n += 1

    def on_sync(self, event: Any) -> None:
        self.t = time.perf_counter()
        self.n += 1


class NoopCallback:
    """A Lightning-style callback object with one no-op hook that counts its calls."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def on_step_end(self, trainer: Any, step: int, batch: Any, metrics: Any) -> None:
        self.n += 1


def sync_dispatch(n_events: int, n_cb: int = 16) -> float:
    """µs per event of a plain synchronous loop over ``n_cb`` callbacks (median of chunks)."""
    cbs = [NoopCallback() for _ in range(n_cb)]
    metrics = {"loss": 0.5}
    chunk = max(n_events // CHUNKS, 1)
    times: list[float] = []
    gc.collect()
    for c in range(CHUNKS):
        t0 = time.perf_counter()
        for i in range(c * chunk, (c + 1) * chunk):
            for cb in cbs:
                cb.on_step_end(None, i, None, metrics)
        times.append(time.perf_counter() - t0)
    check_count("sync dispatch", sum(cb.n for cb in cbs), CHUNKS * chunk * n_cb)
    return med(times) / chunk * 1e6


def _subscribe(bus: EventBus, kind: str, n: int) -> list[Any]:
    handlers: list[Any] = []
    for _ in range(n):
        h = AsyncNoop() if kind == "async" else SyncNoop()
        bus.subscribe(h.on_event, events=(StepEnded,))
        handlers.append(h)
    return handlers


def _events(n: int) -> list[StepEnded]:
    return [StepEnded(step=i, num_steps=n, metrics={"loss": 0.5}) for i in range(n)]


async def burst(kind: str, n_subs: int, n_events: int) -> dict[str, float]:
    """publish (prebuilt), build+publish and burst end-to-end, in µs.

    Publish costs are the median of ``CHUNKS`` timed slices of one burst (a
    slice is ~1 ms: the median drops the slices a noisy neighbour hit); the
    burst end to end is timed whole, from the first publish to ``drain()``.
    """
    chunk = max(n_events // CHUNKS, 1)
    n_events = chunk * CHUNKS
    events = _events(n_events)
    metrics = {"loss": 0.5}
    out: dict[str, float] = {}
    async with EventBus() as bus:
        handlers = _subscribe(bus, kind, n_subs)
        await anyio.sleep(0.01)  # let the subscriber tasks/threads start
        publish = bus.publish
        # 1. prebuilt events: the publisher's cost and the whole burst end to end
        slices: list[float] = []
        gc.collect()
        t0 = time.perf_counter()
        for c in range(CHUNKS):
            ts = time.perf_counter()
            for e in events[c * chunk : (c + 1) * chunk]:
                publish(e)
            slices.append(time.perf_counter() - ts)
        report = await bus.drain(timeout=60)
        t2 = time.perf_counter()
        assert report.ok, report
        check_count(f"burst {kind} x{n_subs}", sum(h.n for h in handlers), n_events * n_subs)
        out["publish"] = med(slices) / chunk * 1e6
        out["burst"] = (t2 - t0) / (n_events * n_subs) * 1e6
        out["burst_event"] = (t2 - t0) / n_events * 1e6
        await anyio.sleep(0.01)  # let def threads finish their post-batch bookkeeping
        # 2. build + publish, as the loop does it
        slices = []
        gc.collect()
        for c in range(CHUNKS):
            ts = time.perf_counter()
            for i in range(c * chunk, (c + 1) * chunk):
                # the loop hands events a fresh read-only mapping each step
                publish(StepEnded(step=i, num_steps=n_events, metrics=FrozenDict(metrics)))
            slices.append(time.perf_counter() - ts)
        await bus.drain(timeout=60)
        check_count(f"build {kind} x{n_subs}", sum(h.n for h in handlers), 2 * n_events * n_subs)
        out["build_publish"] = med(slices) / chunk * 1e6
    return out


async def ring_floor(kind: str, n_subs: int, n_events: int) -> float:
    """µs per event per subscriber of the ring floor (see the module docstring)."""
    events = _events(n_events)
    handlers = [AsyncNoop() if kind == "async" else SyncNoop() for _ in range(n_subs)]
    ring: list[Any] = [None] * n_events
    gc.collect()
    t0 = time.perf_counter()
    head = 0
    for e in events:  # publish: one write into the ring per event
        ring[head] = e
        head += 1
    for h in handlers:  # each subscriber: its handler once per event, in order
        fn = h.on_event
        if kind == "async":
            for i in range(head):
                await fn(ring[i])
        else:
            for i in range(head):
                fn(ring[i])
    dt = time.perf_counter() - t0
    check_count(f"ring {kind} x{n_subs}", sum(h.n for h in handlers), n_events * n_subs)
    return dt / (n_events * n_subs) * 1e6


async def lockstep(kind: str, n_subs: int, n_events: int) -> float:
    """µs per ``await publish_and_wait(event)``."""
    events = _events(n_events)
    async with EventBus() as bus:
        handlers = _subscribe(bus, kind, n_subs)
        await anyio.sleep(0.01)
        gc.collect()
        t0 = time.perf_counter()
        for e in events:
            await bus.publish_and_wait(e, timeout=10)
        dt = time.perf_counter() - t0
        check_count(f"lockstep {kind} x{n_subs}", sum(h.n for h in handlers), n_events * n_subs)
    return dt / n_events * 1e6


async def batching_delay(kind: str, samples: int) -> float:
    """ms from publish to the handler's call on an idle loop, no barrier (median of samples)."""
    stamp = Stamp()
    delays: list[float] = []
    async with EventBus() as bus:
        handler: Callable[[Any], Any] = stamp.on_async if kind == "async" else stamp.on_sync
        bus.subscribe(handler, events=(StepEnded,))
        await anyio.sleep(0.01)
        for i in range(samples):
            t0 = time.perf_counter()
            bus.publish(StepEnded(step=i, num_steps=samples))
            await anyio.sleep(0.03)  # an idle loop, as while a step awaits the GPU
            check_count(f"batching delay {kind}", stamp.n, i + 1)
            delays.append((stamp.t - t0) * 1e3)
    return med(delays)


def scenarios(args: argparse.Namespace) -> list[tuple[str, Callable[[], Any]]]:
    """(key, coroutine factory) for one round; keys identify rows and columns."""
    out: list[tuple[str, Callable[[], Any]]] = []
    for kind in KINDS:
        for n in SUB_COUNTS:
            n_ev = args.events if n <= 16 else max(args.events // 4, 100)
            out.append((f"burst/{kind}/{n}", lambda k=kind, n=n, e=n_ev: burst(k, n, e)))
            out.append((f"ring/{kind}/{n}", lambda k=kind, n=n, e=n_ev: ring_floor(k, n, e)))
        for n in LOCKSTEP_SUBS:
            n_ev = args.lockstep if kind == "async" else max(args.lockstep // 4, 50)
            out.append((f"lockstep/{kind}/{n}", lambda k=kind, n=n, e=n_ev: lockstep(k, n, e)))
        out.append((f"delay/{kind}", lambda k=kind: batching_delay(k, args.delay_samples)))
    return out


async def one_round(
    args: argparse.Namespace, rnd: int, results: dict[str, list[Any]], backend: str
) -> None:
    todo = scenarios(args)
    shift = rnd % len(todo)
    todo = todo[shift:] + todo[:shift]  # rotate: no scenario always runs first or last
    for i, (key, make) in enumerate(todo):
        if i % 3 == 0:  # the baseline, interleaved with the bus scenarios
            results.setdefault("sync16", []).append(sync_dispatch(args.events))
        results.setdefault(f"{backend}/{key}", []).append(await make())


def table(
    results: dict[str, list[Any]], backends: list[str], base: float
) -> tuple[list[list[str]], list[str]]:
    """The main table's rows and the target verdicts."""
    rows: list[list[str]] = []
    verdicts: list[str] = []
    for backend in backends:
        for kind in KINDS:
            one = None
            for n in SUB_COUNTS:
                runs = results[f"{backend}/burst/{kind}/{n}"]
                bp = [r["build_publish"] for r in runs]
                if one is None:
                    one = med(bp)
                bu = [r["burst"] for r in runs]
                ring = results[f"{backend}/ring/{kind}/{n}"]
                ls_key = f"{backend}/lockstep/{kind}/{n}"
                rows.append(
                    [
                        backend,
                        kind,
                        str(n),
                        fmt(med([r["publish"] for r in runs]), 3),
                        fmt(med(bp), 3),
                        fmt(med(bp) / base, 3),
                        fmt(med(bp) / one, 2),
                        fmt(med(bu), 3),
                        fmt(med(ring), 3),
                        fmt(med([b / r for b, r in zip(bu, ring, strict=True)]), 2),
                        fmt(med([r["burst_event"] for r in runs])),
                        fmt(med(results[ls_key]) if ls_key in results else math.nan),
                        f"{spread(bp)} / {spread(bu)}",
                    ]
                )
            verdicts += _verdicts(results, backend, kind, base)
    return rows, verdicts


def _verdicts(results: dict[str, list[Any]], backend: str, kind: str, base: float) -> list[str]:
    pubs = [
        med([r["build_publish"] for r in results[f"{backend}/burst/{kind}/{n}"]])
        for n in SUB_COUNTS
    ]
    flat = max(pubs) / min(pubs)
    b16 = med([r["build_publish"] for r in results[f"{backend}/burst/{kind}/16"]])
    out = [
        f"{backend}/{kind}: build+publish with 16 subs = {b16 / base:.3f}x sync16 "
        f"(target <= 0.5: {verdict(b16 / base <= 0.5, f'{backend} {kind}: 16 subs / bare <= 0.5')}); "
        f"1->64 subs max/min = {flat:.2f} (target <= 1.2: {verdict(flat <= 1.2, f'{backend} {kind}: 1->64 subs max/min <= 1.2')})"
    ]
    e16 = [r["burst"] for r in results[f"{backend}/burst/{kind}/16"]]
    r16 = results[f"{backend}/ring/{kind}/16"]
    x16 = med([b / r for b, r in zip(e16, r16, strict=True)])
    out.append(
        f"{backend}/{kind}: burst e2e with 16 subs = {x16:.2f}x the ring floor "
        f"(target <= 2.5: {verdict(x16 <= 2.5, f'{backend} {kind}: x16 <= 2.5')})"
    )
    if kind == "async":
        out.append(
            f"{backend}/async: burst e2e with 16 subs = {med(e16):.3f} µs/event/sub "
            f"(target < 1: {verdict(med(e16) < 1, f'{backend} {kind}: burst e16 < 1')})"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median of these)")
    ap.add_argument("--events", type=int, default=10_000, help="events per burst")
    ap.add_argument("--lockstep", type=int, default=1_000, help="events per lockstep run")
    ap.add_argument("--delay-samples", type=int, default=8, help="samples per delay run")
    ap.add_argument("--backends", default="asyncio,trio")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 1 round, small sizes")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.events, args.lockstep, args.delay_samples = 1, 1_000, 100, 2
    backends = [b for b in args.backends.split(",") if b]
    started = time.perf_counter()
    results: dict[str, list[Any]] = {}
    for rnd in range(args.repeats):
        order = backends if rnd % 2 == 0 else backends[::-1]
        for backend in order:
            anyio.run(one_round, args, rnd, results, backend, backend=backend)
    wall = time.perf_counter() - started

    print(f"bench_bus: {machine()}")
    print(
        f"command: python benchmarks/bench_bus.py {' '.join(sys.argv[1:])}".rstrip()
        + f"   ({args.repeats} interleaved rounds, {wall:.0f} s)"
    )
    sync16 = results["sync16"]
    base = med(sync16)
    print(
        f"\nbaseline: plain sync loop calling 16 no-op callbacks = {fmt(base)} µs/event "
        f"({fmt(base / 16 * 1000, 0)} ns/callback), spread {spread(sync16)}, n={len(sync16)}"
    )
    headers = [
        "backend",
        "handler",
        "subs",
        "publish µs",
        "build+publish µs",
        "x sync16",
        "vs 1 sub",
        "burst e2e µs/ev/sub",
        "ring floor µs/ev/sub",
        "x ring",
        "burst µs/ev",
        "lockstep µs/ev",
        "spread (b+p / burst)",
    ]
    rows, verdicts = table(results, backends, base)
    print_table(headers, rows, title="publish, burst and lockstep (medians)")

    delay_rows = []
    for backend in backends:
        for kind in KINDS:
            d = results[f"{backend}/delay/{kind}"]
            delay_rows.append([backend, kind, fmt(med(d)), spread(d)])
    print_table(
        ["backend", "handler", "batching delay ms (1 event, no barrier)", "spread"],
        delay_rows,
        title="batching delay (EventBus defaults: batch_size=32, batch_delay=5 ms)",
    )
    print("\ntargets:")
    for v in verdicts:
        print("  " + v)


if __name__ == "__main__":
    run_main(main)
