"""EventBus across threads: publish from foreign threads and from ``def`` handlers.

DESIGN rule 5: ``publish`` is thread-safe, never waits for the loop, returns
``None`` off the loop thread, and an idle loop wakes up to deliver (no
loop-side publish needed). Order per publishing thread is kept, every event
reaches every Lossless subscriber, and sequence numbers stay strictly
increasing per subscriber.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

import evsys_async as ev
from evsys_async.events import Envelope, Event, StepEnded

pytestmark = pytest.mark.anyio

WAIT = 10.0


class ThrTestMsg(Event):
    source: str
    i: int


class Counter:
    """An async handler; ``done`` is set once ``goal`` events arrived."""

    def __init__(self, goal: int) -> None:
        self.items: list[Any] = []
        self.goal = goal
        self.done = anyio.Event()

    async def __call__(self, event: Any) -> None:
        self.items.append(event)
        if len(self.items) >= self.goal:
            self.done.set()


class SyncCounter:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.items.append(event)


def _by_source(items: list[Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e in items:
        event = e.event if isinstance(e, Envelope) else e
        out.setdefault(event.source, []).append(event.i)
    return out


async def test_publish_from_threads_returns_none_keeps_order_loses_nothing() -> None:
    n_threads, per_thread = 6, 400
    total = n_threads * per_thread + per_thread
    returned: list[Any] = []
    start = threading.Barrier(n_threads)

    def worker(name: str) -> None:
        start.wait()
        for i in range(per_thread):
            returned.append(bus.publish(ThrTestMsg(source=name, i=i)))

    async with ev.EventBus(batch_size=16, close_timeout=5) as bus:
        watcher = Counter(total)
        bus.subscribe(watcher, envelopes=True, events=(ThrTestMsg,))
        sync_watcher = SyncCounter()
        bus.subscribe(sync_watcher, envelopes=True, events=(ThrTestMsg,))
        bounded = Counter(0)
        bus.subscribe(bounded, policy=ev.DropOldest(10_000), events=(ThrTestMsg,))
        threads = [
            threading.Thread(target=worker, args=(f"t{k}",), daemon=True) for k in range(n_threads)
        ]
        for t in threads:
            t.start()
        for i in range(per_thread):  # the loop publishes meanwhile
            bus.publish(ThrTestMsg(source="loop", i=i))
            if i % 16 == 0:
                await checkpoint()
        with anyio.fail_after(WAIT):
            await watcher.done.wait()  # no drain, no barrier: the bus delivers on its own
        for t in threads:
            t.join(WAIT)
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert returned == [None] * (n_threads * per_thread)
    for items in (watcher.items, sync_watcher.items):
        assert len(items) == total
        seqs = [e.seq for e in items]
        assert seqs == sorted(seqs) and len(set(seqs)) == total
        assert _by_source(items) == {
            name: list(range(per_thread)) for name in ["loop", *(f"t{k}" for k in range(n_threads))]
        }
    assert [e.seq for e in sync_watcher.items] == [e.seq for e in watcher.items]
    assert bus.stats()["Counter#2"].dropped == 0


async def test_idle_loop_wakes_for_a_foreign_publish() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        got = Counter(1)
        got_sync = SyncCounter()
        bus.subscribe(got)
        bus.subscribe(got_sync)
        with anyio.fail_after(WAIT):
            for k in range(3):
                got.goal = k + 1
                got.done = anyio.Event()
                # the loop does nothing but wait for the handler's own signal
                await anyio.to_thread.run_sync(bus.publish, ThrTestMsg(source="x", i=k))
                await got.done.wait()
            assert (await bus.drain()).ok
    assert [e.i for e in got.items] == [0, 1, 2] == [e.i for e in got_sync.items]


async def test_publish_from_a_def_handler_thread_is_numbered_before_it_counts_as_done() -> None:
    # rule 5: a def batch's completion takes in the intake first, so a barrier on the
    # triggering event also sees what the handler published, on both backends.
    async with ev.EventBus(close_timeout=5) as bus:
        downstream = Counter(0)

        def relay(event: StepEnded) -> None:
            assert bus.publish(ThrTestMsg(source="relay", i=event.step)) is None

        relay_sub = bus.subscribe(relay, events=(StepEnded,))
        bus.subscribe(downstream, events=(ThrTestMsg,), envelopes=True)
        with anyio.fail_after(WAIT):
            for i in range(20):
                seq = bus.publish(StepEnded(step=i, num_steps=20))
                assert seq is not None
                assert await relay_sub.wait(seq, timeout=WAIT)
                assert bus.last_seq == seq + 1  # the relayed event is numbered already
            assert (await bus.drain()).ok
    assert [e.event.i for e in downstream.items] == list(range(20))


async def test_publish_from_a_thread_before_enter_raises_and_after_close_counts() -> None:
    bus = ev.EventBus(close_timeout=5)
    with pytest.raises(ev.BusClosedError, match="async with EventBus"):
        await anyio.to_thread.run_sync(bus.publish, ThrTestMsg(source="x", i=0))
    with pytest.raises(TypeError):
        async with bus:
            await anyio.to_thread.run_sync(bus.publish, "not an event")
    assert await anyio.to_thread.run_sync(bus.publish, ThrTestMsg(source="x", i=1)) is None
    assert bus.dropped_after_close == 1


async def test_stats_from_another_thread_is_safe() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(Counter(0), name="c")
        for i in range(10):
            bus.publish(ThrTestMsg(source="loop", i=i))
        with anyio.fail_after(WAIT):
            await bus.drain()
            st = await anyio.to_thread.run_sync(bus.stats)
    assert st["c"].delivered == 10


async def test_publishes_while_the_bus_closes_are_delivered_or_counted() -> None:
    # Leaving the block drains, then ends every subscription, then waits for them
    # to close (a def subscriber's on_close runs in its thread). A thread that
    # publishes in that window must see its events delivered or counted in
    # dropped_after_close (and logged), never numbered and routed to nobody.
    closing, published = threading.Event(), threading.Event()

    def on_close() -> None:
        closing.set()
        published.wait(WAIT)  # the subscriber is still closing while the thread publishes

    def worker() -> None:
        closing.wait(WAIT)
        for i in range(10):
            bus.publish(ThrTestMsg(source="late", i=i))
        published.set()

    got = SyncCounter()
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            bus.subscribe(got, on_close=on_close)
            t = threading.Thread(target=worker, daemon=True)
            t.start()
            bus.publish(ThrTestMsg(source="loop", i=0))
        await anyio.to_thread.run_sync(t.join, WAIT)
    late = [e for e in got.items if e.source == "late"]
    assert len(late) + bus.dropped_after_close == 10
