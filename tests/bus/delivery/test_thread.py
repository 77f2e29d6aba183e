"""ThreadDelivery (``bus/_delivery/thread.py``): a ``def`` handler runs in a daemon thread of its own.

A blocking handler holds its own thread only; one past its ``timeout`` is
abandoned (counted as failed once, no longer waited for) and its next call
waits for it, so order holds; what a handler publishes from its thread is
numbered before the handler counts as done; ``drain`` from inside a handler
does not wait for it.
"""

from __future__ import annotations

import threading

import anyio
import anyio.lowlevel
import pytest

import evsys_async as ev
from evsys_async.events import (
    CallbackFailed,
    StepEnded,
)
from tests.bus.helpers import (
    WAIT,
    Counter,
    Rec,
    SyncRec,
    ThrTestMsg,
    step,
    steps_of,
    thread_wait,
)

pytestmark = pytest.mark.anyio


async def test_blocking_def_handler_stalls_neither_publisher_nor_siblings() -> None:
    n = 200
    release, entered = threading.Event(), threading.Event()
    blocked_got: list[int] = []

    def blocking(event: StepEnded) -> None:
        entered.set()
        release.wait()  # blocking I/O stand-in: holds its own thread only
        blocked_got.append(event.step)

    async with ev.EventBus(close_timeout=5) as bus:
        try:
            bus.subscribe(blocking)
            sib_async, sib_def = Rec(), SyncRec()
            bus.subscribe(sib_async)
            bus.subscribe(sib_def)
            bus.publish(step(0))
            await thread_wait(entered)  # the handler holds its thread from here on
            for i in range(1, n):
                bus.publish(step(i))  # the publisher finishes its work meanwhile
            with anyio.fail_after(WAIT):
                report = await bus.drain(timeout=0.2)
                assert not report.ok and set(report.pending) == {"blocking"}
                st = bus.stats()
                assert st["Rec"].delivered == st["SyncRec"].delivered == n
                assert st["blocking"].delivered == 0 and blocked_got == []
                assert st["blocking"].pending == n  # in its hands or waiting: not handled
        finally:
            release.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert blocked_got == list(range(n))
    assert steps_of(sib_async.items) == steps_of(sib_def.items) == list(range(n))


async def test_hanging_def_handler_abandoned_not_waited_for_and_order_holds() -> None:
    release = threading.Event()
    calls: list[tuple[str, int]] = []

    def hangs_on_zero(event: StepEnded) -> None:
        calls.append(("start", event.step))
        if event.step == 0:
            release.wait()
        calls.append(("end", event.step))

    async with ev.EventBus(close_timeout=5) as bus:
        try:
            failures = Rec()
            bus.subscribe(failures, events=(CallbackFailed,))
            sub = bus.subscribe(hangs_on_zero, events=(StepEnded,), timeout=0.1)
            bus.publish(step(0))
            bus.publish(step(1))
            with anyio.fail_after(WAIT):
                report = await bus.drain(timeout=WAIT)  # returns at the handler's timeout
                assert report.ok and report.stuck == ("hangs_on_zero",)
                assert sub.stuck
                report = await bus.publish_and_wait(step(2), timeout=WAIT)
                assert report.ok and report.stuck == ("hangs_on_zero",)
                assert (await bus.drain()).ok  # the CallbackFailed reached its watcher
            assert calls == [("start", 0)]  # its next call waits for the hung one
            assert bus.stats()["hangs_on_zero"].failed == 1
            [failed] = failures.items
            assert failed.event_type == "StepEnded" and "timeout" in failed.error
        finally:
            release.set()
        with anyio.fail_after(WAIT):
            while sub.stuck:  # a stuck handler is not waited for: let it return
                await anyio.sleep(0.001)
            assert await sub.aclose(timeout=WAIT)  # waits for its thread to finish
        assert not sub.stuck
        # order held, and the wait for the hung call did not count against the next ones
        assert calls == [
            ("start", 0),
            ("end", 0),
            ("start", 1),
            ("end", 1),
            ("start", 2),
            ("end", 2),
        ]
        assert bus.stats()["hangs_on_zero"].failed == 1


@pytest.mark.anyio
async def test_a_def_handler_hanging_in_its_last_batch_is_abandoned_at_its_timeout() -> None:
    """aclose and close stop waiting once the handler is past its timeout."""
    release = threading.Event()
    closed = threading.Event()
    async with ev.EventBus(close_timeout=60) as bus:

        def hangs(event: StepEnded) -> None:
            release.wait(60)

        sub = bus.subscribe(hangs, events=(StepEnded,), timeout=0.1, on_close=closed.set)
        bus.publish(StepEnded(step=0, num_steps=1))  # still in the buffer: the last batch
        with anyio.fail_after(20):  # far below close_timeout and the aclose deadline
            assert not await sub.aclose(timeout=60)
        assert sub.stuck
        assert sub.stats().failed == 1
        assert not closed.is_set()
        release.set()
    with anyio.fail_after(20):
        while not closed.is_set():  # on_close runs in its thread once the call returns
            await anyio.sleep(0.01)


async def test_drain_inside_a_def_handler_skips_the_caller() -> None:
    # Called from inside a handler, drain and publish_and_wait do not wait
    # for the calling subscriber. A def handler reaches them through
    # anyio.from_thread.run; waiting for itself would block until the timeout.
    reports: list[ev.DrainReport] = []

    async with ev.EventBus(close_timeout=5) as bus:
        token = anyio.lowlevel.current_token()

        def drainer(event: StepEnded) -> None:
            if event.step == 1:
                reports.append(anyio.from_thread.run(bus.drain, 1.0, token=token))

        bus.subscribe(drainer, events=(StepEnded,))
        bus.subscribe(Rec())
        for i in range(3):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            await bus.drain()
    [report] = reports
    assert report.ok, report


async def test_publish_from_a_def_handler_thread_is_numbered_before_it_counts_as_done() -> None:
    # A def batch's completion takes in the intake first, so a barrier on the
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
