"""The way events come in (``_intake.py``): sequence numbers, publishing from any thread, after close.

``publish`` is thread-safe and never waits for the loop: on the loop thread it
returns the event's sequence number, from any other thread ``None`` (the event
is numbered when the loop takes it in), and an idle loop wakes up to deliver.
Order per publishing thread is kept, every event reaches every Lossless
subscriber, and sequence numbers increase strictly per subscriber. After the
bus closes a publish from any thread is counted and logged once, never raised.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.lowlevel import checkpoint

import evsys_async as ev
from evsys_async.events import (
    Envelope,
    EvalEnded,
    Event,
    StepEnded,
)
from tests.bus.helpers import (
    WAIT,
    BusTestPing,
    Counter,
    Rec,
    SyncCounter,
    SyncRec,
    ThrTestMsg,
    by_source,
    failure_messages,
    ping,
    step,
)

pytestmark = pytest.mark.anyio


# -- sequence numbers and envelopes ---------------------------------------------------


async def test_envelopes_carry_bus_id_and_strictly_increasing_seq() -> None:
    async with ev.EventBus(bus_id="bus-1", close_timeout=5) as bus:
        got, got_sync = Rec(), SyncRec()
        bus.subscribe(got, envelopes=True)
        bus.subscribe(got_sync, envelopes=True, events=(StepEnded,))
        seqs = [bus.publish(step(i)) if i % 2 else bus.publish(ping(i)) for i in range(50)]
        assert seqs == list(range(50)) and bus.last_seq == 49
        with anyio.fail_after(WAIT):
            await bus.drain()
    assert all(isinstance(e, Envelope) and e.bus_id == "bus-1" for e in got.items)
    assert [e.seq for e in got.items] == seqs
    assert [e.event.n for e in got.items if isinstance(e.event, BusTestPing)] == list(
        range(0, 50, 2)
    )
    assert [e.seq for e in got_sync.items] == list(range(1, 50, 2))
    assert all(e.event.step == e.seq for e in got_sync.items)


async def test_publish_from_async_and_def_handlers() -> None:
    returned: list[Any] = []

    async def a(event: BusTestPing) -> None:
        returned.append(("async", bus.publish(step(event.n))))

    def d(event: BusTestPing) -> None:
        returned.append(("def", bus.publish(EvalEnded(step=event.n, eval_name="from-def"))))

    async with ev.EventBus(close_timeout=5) as bus:
        everything = Rec()
        bus.subscribe(a, events=(BusTestPing,))
        bus.subscribe(d, events=(BusTestPing,))
        bus.subscribe(everything, envelopes=True)
        with anyio.fail_after(WAIT):
            for i in range(5):
                await bus.publish_and_wait(ping(i))
            assert (await bus.drain()).ok
    kinds = [type(e.event).__name__ for e in everything.items]
    assert kinds.count("StepEnded") == kinds.count("EvalEnded") == 5
    assert all(isinstance(seq, int) for kind, seq in returned if kind == "async")
    assert all(seq is None for kind, seq in returned if kind == "def")  # from its thread
    seqs = [e.seq for e in everything.items]
    assert seqs == sorted(seqs) == list(range(len(seqs)))


# -- publishing from other threads ----------------------------------------------------


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
        assert by_source(items) == {
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


async def test_a_thread_publishing_while_events_flow_does_not_wake_the_loop_each_time() -> None:
    """A trainer's thread publishing a step every millisecond (a Session): the pump's
    timer takes the events in while they flow, so the loop is woken for a few of them,
    not for each (each wake is the loop's thread taking the GIL from the trainer's);
    every event still arrives, in order, without a drain."""
    n = 200

    def trainer() -> None:
        for i in range(n):
            bus.publish(ThrTestMsg(source="trainer", i=i))
            threading.Event().wait(0.001)

    async with ev.EventBus(batch_delay=0.05, batch_size=1000, close_timeout=5) as bus:
        got = Counter(n)
        bus.subscribe(got, events=(ThrTestMsg,))
        with anyio.fail_after(WAIT):
            await anyio.to_thread.run_sync(trainer)
            await got.done.wait()  # delivered by the pump's own ticks
        wakes = bus._pump.thread_wakes
    assert [e.i for e in got.items] == list(range(n))
    # one wake per publish before (200); now one when the timer is not armed (the
    # first, and after any pause of the trainer's thread longer than a batch delay)
    assert wakes <= n // 4, wakes


@pytest.mark.parametrize("gap", [0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
async def test_a_thread_publish_as_the_timer_disarms_is_never_left_behind(gap: float) -> None:
    """Events from a thread with pauses around the pump's batch delay (0.02 s): some
    land while the timer is about to disarm; each arrives on its own (no drain, no
    barrier, no later publish to push it), within a bounded time."""
    async with ev.EventBus(batch_delay=0.02, close_timeout=5) as bus:
        got = Counter(1)
        bus.subscribe(got, events=(ThrTestMsg,))
        for k in range(8):
            got.goal, got.done = k + 1, anyio.Event()
            with anyio.fail_after(WAIT):
                await anyio.to_thread.run_sync(threading.Event().wait, gap)
                await anyio.to_thread.run_sync(bus.publish, ThrTestMsg(source="t", i=k))
                await got.done.wait()
    assert [e.i for e in got.items] == list(range(8))


async def test_publish_from_a_thread_before_enter_raises_and_after_close_counts() -> None:
    bus = ev.EventBus(close_timeout=5)
    with anyio.fail_after(WAIT):
        with pytest.raises(ev.BusClosedError, match="async with EventBus"):
            await anyio.to_thread.run_sync(bus.publish, ThrTestMsg(source="x", i=0))
        with pytest.raises(TypeError):
            async with bus:
                await anyio.to_thread.run_sync(bus.publish, "not an event")
        assert await anyio.to_thread.run_sync(bus.publish, ThrTestMsg(source="x", i=1)) is None
    assert bus.dropped_after_close == 1


# -- after close -----------------------------------------------------------------------


async def test_publish_after_close_counted_and_logged_once(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            got = Rec()
            bus.subscribe(got)
        assert bus.publish(step(0)) is None  # never raises
        bus.publish(step(1))
        await anyio.to_thread.run_sync(bus.publish, step(2))
    assert bus.dropped_after_close == 3
    assert got.items == []
    assert len([m for m in failure_messages(warnings_log) if "after the bus closed" in m]) == 1


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


# -- cross-thread order ------------------------------------------------------------


class CausalMsg(Event, kw_only=True):
    source: str
    i: int


async def test_a_threads_publish_before_the_loops_is_numbered_first() -> None:
    got: list[Any] = []

    async def record(env: ev.Envelope) -> None:
        got.append(env)

    with anyio.fail_after(10):
        async with ev.EventBus() as bus:
            bus.subscribe(record, events=(CausalMsg,), envelopes=True)
            for i in range(200):
                published = threading.Event()

                def from_thread(i: int = i, done: threading.Event = published) -> None:
                    bus.publish(CausalMsg(source="thread", i=i))
                    done.set()

                threading.Thread(target=from_thread).start()
                # block the loop itself (as a step boundary does): the thread's wake
                # callback cannot run before the loop's own publish below
                published.wait(10)
                bus.publish(CausalMsg(source="loop", i=i))  # happens after the thread's
                await anyio.lowlevel.checkpoint()
            assert (await bus.drain()).ok
    sources = [e.event.source for e in sorted(got, key=lambda e: e.seq)]
    assert sources == ["thread", "loop"] * 200
