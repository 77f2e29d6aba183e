"""The pump (``_pump.py``): batching, lag reports, and the waits of drain and barriers.

A subscriber is woken when its backlog reaches ``batch_size`` or its oldest
pending event is ``batch_delay`` old, and at once while ``drain``,
``publish_and_wait`` or ``Subscription.wait`` waits. ``SubscriberLagged`` is
published at ``lag_threshold`` and each doubling. Nothing here reads a clock:
a batch that is not due is shown by ``wait_all_tasks_blocked``, a due one by a
wait under ``fail_after`` far shorter than the bus's ``batch_delay``.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

import evsys_async as ev
from evsys_async.events import (
    EvalEnded,
    Event,
    StepEnded,
    SubscriberLagged,
)
from tests.bus.helpers import (
    WAIT,
    BusTestPing,
    Rec,
    SyncRec,
    ping,
    step,
    steps_of,
    thread_wait,
)

pytestmark = pytest.mark.anyio


# -- batching ----------------------------------------------------------------------


async def _warm(bus: ev.EventBus, rec: Rec) -> None:
    """One event through, so the pump has ticked once: the first tick after the bus
    opens finds every backlog old enough to hand over."""
    bus.publish(ping(-1))
    with anyio.fail_after(WAIT):
        assert (await bus.drain()).ok
    assert len(rec.items) == 1


async def test_a_full_batch_is_handed_over_without_waiting_for_the_delay() -> None:
    # a task's batch is four times the bus's batch_size (a wake is a task switch): 4 here
    async with ev.EventBus(batch_size=1, batch_delay=60, close_timeout=5) as bus:
        rec = Rec()
        bus.subscribe(rec)
        await _warm(bus, rec)
        for i in range(3):
            bus.publish(ping(i))
            await wait_all_tasks_blocked()
        assert len(rec.items) == 1  # fewer than batch_size, delay far off: not due
        for i in range(3, 8):
            bus.publish(ping(i))
            await wait_all_tasks_blocked()
        with anyio.fail_after(WAIT):  # far below batch_delay: the full batch woke it
            await rec.reached(1 + 4)


async def test_a_partial_batch_is_handed_over_after_the_delay() -> None:
    async with ev.EventBus(batch_size=1000, batch_delay=0.01, close_timeout=5) as bus:
        rec = Rec()
        bus.subscribe(rec)
        await _warm(bus, rec)
        bus.publish(ping(0))
        with anyio.fail_after(WAIT):  # no barrier, no further publish: the timer does it
            await rec.reached(2)


@pytest.mark.parametrize("how", ["wait", "publish_and_wait", "drain"])
async def test_a_waiter_has_every_backlog_handed_over_at_once(how: str) -> None:
    async with ev.EventBus(batch_size=1000, batch_delay=60, close_timeout=5) as bus:
        rec = Rec()
        sub = bus.subscribe(rec)
        await _warm(bus, rec)
        seq = None
        for i in range(3):
            seq = bus.publish(ping(i))
            await wait_all_tasks_blocked()
        assert seq is not None and len(rec.items) == 1  # not due
        with anyio.fail_after(WAIT):
            if how == "wait":
                assert await sub.wait(seq, timeout=WAIT)
            elif how == "publish_and_wait":
                assert (await bus.publish_and_wait(ping(3), timeout=WAIT)).ok
            else:
                assert (await bus.drain(timeout=WAIT)).ok
        assert [e.n for e in rec.items[1:4]] == [0, 1, 2]


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_a_wake_hands_over_everything_pending_as_one_batch(kind: str) -> None:
    got: list[int] = []
    batches: list[int] = []

    def count(event: BusTestPing) -> None:
        got.append(event.n)

    def flush() -> None:
        batches.append(len(got) - sum(batches))

    if kind == "async":

        async def handler(event: BusTestPing) -> None:
            count(event)

        async def on_batch_end() -> None:
            flush()
    else:
        handler, on_batch_end = count, flush  # type: ignore[assignment]

    async with ev.EventBus(batch_size=4, close_timeout=5) as bus:
        bus.subscribe(handler, events=(BusTestPing,), on_batch_end=on_batch_end)
        for i in range(10):  # no await in between: the pump has not run yet
            bus.publish(ping(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert got == list(range(10))
    assert batches == [10]  # one wake, one batch, one flush: not three batches of four


# -- lag ---------------------------------------------------------------------------


async def test_drop_oldest_bound_counts_and_lag_reports_at_doublings() -> None:
    gate, entered = anyio.Event(), anyio.Event()
    got: list[int] = []

    async def windowed(event: StepEnded) -> None:
        got.append(event.step)
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=10_000, close_timeout=5) as bus:
        lagged = Rec()
        bus.subscribe(lagged, events=(SubscriberLagged,))
        bus.subscribe(windowed, events=(StepEnded,), policy=ev.DropOldest(3))
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            await entered.wait()
        for i in range(1, 21):
            bus.publish(step(i))
            st = bus.stats()["windowed"]  # one walk per publish
            assert st.pending <= 3 + 1  # its window and the one in its hands
        assert st.dropped == 17 and st.max_pending == 3
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert got == [0, 18, 19, 20]
    reports = [(r.subscriber, r.dropped) for r in lagged.items]
    assert reports == [
        ("windowed", 1),
        ("windowed", 2),
        ("windowed", 4),
        ("windowed", 8),
        ("windowed", 16),
    ]


async def test_lossless_lag_at_threshold_and_doublings_never_to_itself() -> None:
    gate, entered = anyio.Event(), anyio.Event()
    own: list[Event] = []

    async def laggard(event: Event) -> None:
        own.append(event)
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=4, close_timeout=5) as bus:
        lagged = Rec()
        bus.subscribe(lagged, events=(SubscriberLagged,))
        bus.subscribe(laggard, events=(StepEnded, SubscriberLagged))
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            await entered.wait()
        for i in range(1, 21):
            bus.publish(step(i))
            bus.stats()  # one walk per publish
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st = bus.stats()["laggard"]
    assert [r.pending for r in lagged.items] == [4, 8, 16]
    assert all(r.subscriber == "laggard" and r.dropped == 0 for r in lagged.items)
    assert not any(isinstance(e, SubscriberLagged) for e in own)  # never to itself
    assert steps_of(own) == list(range(21)) and st.dropped == 0


async def test_lossless_lag_jump_reports_once_per_crossing() -> None:
    # Twenty events walked at once cross 4, 8 and 16 in one go: one report with the
    # current count, not the same report at every later tick until the mark catches up.
    gate, entered = anyio.Event(), anyio.Event()

    async def laggard(event: Event) -> None:
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=4, close_timeout=5) as bus:
        lagged = Rec()
        bus.subscribe(lagged, events=(SubscriberLagged,))
        bus.subscribe(laggard, events=(StepEnded,))
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            await entered.wait()
        for i in range(1, 21):
            bus.publish(step(i))
        for _ in range(5):
            bus.stats()  # five walks, nothing new
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert [r.pending for r in lagged.items] == [20]


async def test_latest_coalescing_alone_is_not_lag() -> None:
    # A bounded subscriber reports lag when arrivals since its last take
    # cross lag_threshold, or when max_kept/maxlen forces a drop. Replacing a
    # pending StepEnded by a newer one is what Latest is for (a progress bar).
    gate, entered = anyio.Event(), anyio.Event()

    async def bar(event: StepEnded) -> None:
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=1000, close_timeout=5) as bus:
        lagged = Rec()
        bus.subscribe(lagged, events=(SubscriberLagged,))
        bus.subscribe(bar, events=(StepEnded,), policy=ev.Latest())
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            await entered.wait()
        for i in range(1, 10):
            bus.publish(step(i))
            bus.stats()
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        assert bus.stats()["bar"].dropped == 8
    assert lagged.items == []


# -- drain -------------------------------------------------------------------------


async def test_drain_returns_a_report_and_does_not_raise_on_deadline() -> None:
    gate = anyio.Event()

    async def held(event: Any) -> None:
        await gate.wait()

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(held)
        bus.subscribe(Rec())
        for i in range(3):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            report = await bus.drain(timeout=0.05)
        assert isinstance(report, ev.DrainReport)
        gate.set()
        assert not report.ok and set(report.pending) == {"held"} and report.stuck == ()
        assert report.pending["held"] >= 1
        with anyio.fail_after(WAIT):
            report = await bus.drain(timeout=None)
        assert report.ok and report.pending == {}


async def test_drain_includes_events_published_while_it_waits() -> None:
    async def chain(event: BusTestPing) -> None:
        await checkpoint()
        if event.n < 20:
            bus.publish(ping(event.n + 1))

    def chain_sync(event: StepEnded) -> None:
        if event.step < 20:
            bus.publish(step(event.step + 1))  # from its thread

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(chain, events=(BusTestPing,))
        bus.subscribe(chain_sync, events=(StepEnded,))
        everything = Rec()
        bus.subscribe(everything)
        bus.publish(ping(0))
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        got = list(everything.items)
    assert [e.n for e in got if isinstance(e, BusTestPing)] == list(range(21))
    assert steps_of(got) == list(range(21))


# -- publish_and_wait --------------------------------------------------------------


async def test_publish_and_wait_is_a_barrier_and_names_who_had_not() -> None:
    gate = anyio.Event()

    async def held(event: Any) -> None:
        await gate.wait()

    async with ev.EventBus(close_timeout=5) as bus:
        fast_a, fast_d = Rec(), SyncRec()
        bus.subscribe(fast_a, events=(StepEnded,))
        bus.subscribe(fast_d, events=(StepEnded,))
        with anyio.fail_after(WAIT):
            report = await bus.publish_and_wait(step(0), timeout=WAIT)
            assert report.ok and report.pending == {}
            assert steps_of(fast_a.items) == steps_of(fast_d.items) == [0]
            bus.subscribe(held, events=(StepEnded,))
            bus.subscribe(Rec(), events=(EvalEnded,), name="never-matches")
            report = await bus.publish_and_wait(step(1), timeout=0.1)
            assert not report.ok and report.pending == {"held": 1}
            assert steps_of(fast_a.items) == steps_of(fast_d.items) == [0, 1]
            gate.set()
            report = await bus.publish_and_wait(step(2))
            assert report.ok


# -- timers ------------------------------------------------------------------------


async def test_def_timeout_detected_when_the_pump_started_the_call() -> None:
    # The pump's own tick hands the batch to the thread (the batch delay passed, no
    # barrier waiting); nobody arms a timer for the call's timeout, so a later drain
    # sleeps until its own deadline instead of returning at the handler's timeout.
    release, entered = threading.Event(), threading.Event()

    def hangs(event: Any) -> None:
        entered.set()
        release.wait()

    async with ev.EventBus(close_timeout=5) as bus:
        try:
            sub = bus.subscribe(hangs, timeout=0.1)
            bus.publish(ping(0))
            await thread_wait(entered)  # started by the pump, not by a barrier
            with anyio.fail_after(5):
                report = await bus.drain(timeout=30)
            assert report.ok and report.stuck == ("hangs",) and sub.stuck
        finally:
            release.set()


async def test_def_call_in_flight_with_a_timeout_does_not_delay_siblings() -> None:
    # A def handler with timeout=30 is in a call: the pump's timer is armed for its
    # deadline 30 s out, and publish() then trusts that timer to deliver new events.
    release, entered = threading.Event(), threading.Event()

    def busy(event: Any) -> None:
        entered.set()
        release.wait()

    async with ev.EventBus(close_timeout=5) as bus:
        try:
            bus.subscribe(busy, events=(StepEnded,), timeout=30)
            sibling = Rec()
            bus.subscribe(sibling, events=(BusTestPing,))
            bus.publish(step(0))
            await thread_wait(entered)
            with anyio.fail_after(5):
                for i in range(3):
                    bus.publish(ping(i))
                    await sibling.reached(i + 1)  # no barrier: the bus delivers on its own
        finally:
            release.set()


# -- waiters are told when something moved, not on every tick ---------------------


async def test_closing_many_def_subscribers_does_not_spin_the_loop(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The close waited for 16 def threads while every tick woke every waiter and each
    # of their ticks woke them all again: a spin on the event loop that held the GIL
    # from those threads (drains of 400 ms instead of 5). Counted, not timed: the
    # ticks of a run stay bounded by what happened in it.
    from evsys_async.bus._pump import Pump

    ticks = 0
    real_tick = Pump.tick

    def counting_tick(self: Pump) -> float:
        nonlocal ticks
        ticks += 1
        return real_tick(self)

    monkeypatch.setattr(Pump, "tick", counting_tick)

    class Noop(ev.Callback):
        def on_step_end(self, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            pass

    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        return {"loss": 1.0}

    worst = 0
    for run in range(20):
        ticks = 0
        loop = ev.TrainingLoop(
            step, num_steps=1000, output_dir=tmp_path, run_key=f"r{run}",
            callbacks=[Noop() for _ in range(16)],
        )  # fmt: skip
        with anyio.fail_after(WAIT):
            artifacts = await loop.run()
        assert all(h.delivered == 1000 for h in artifacts.callback_report.values())
        worst = max(worst, ticks)
    # ~30 walks of a batch, plus for each of the 16 closes a few ticks per thread that
    # finished; the spin made tens of thousands
    assert worst < 2000, worst
