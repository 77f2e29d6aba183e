"""TaskDelivery (``bus/_delivery/task.py``): an ``async def`` handler runs in a task of its own.

A slow handler stalls no sibling; one past its ``timeout`` is cancelled and
counted as failed; a batch counts as handled only after its ``on_batch_end``;
``drain`` and ``publish_and_wait`` called from inside a handler do not wait for
it; events that arrive while it is busy are delivered without anyone asking.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.lowlevel import checkpoint

import evsys_async as ev
from evsys_async.events import (
    CallbackFailed,
    StepEnded,
)
from tests.bus.helpers import (
    WAIT,
    Rec,
    SyncRec,
    failure_messages,
    step,
    steps_of,
)

pytestmark = pytest.mark.anyio


async def test_slow_async_handler_stalls_no_sibling() -> None:
    n = 200
    gate = anyio.Event()
    slow_got: list[int] = []

    async def slow(event: StepEnded) -> None:
        await gate.wait()
        slow_got.append(event.step)

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(slow)
        sib_async, sib_def = Rec(), SyncRec()
        bus.subscribe(sib_async)
        bus.subscribe(sib_def)
        for i in range(n):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            report = await bus.drain(timeout=0.2)
            assert set(report.pending) == {"slow"}
            st = bus.stats()
            assert st["Rec"].delivered == st["SyncRec"].delivered == n
            assert st["slow"].delivered == 0 and slow_got == []
            gate.set()
            assert (await bus.drain()).ok
    assert slow_got == list(range(n))
    assert steps_of(sib_async.items) == steps_of(sib_def.items) == list(range(n))


async def test_hanging_async_handler_cancelled_at_timeout(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    got: list[int] = []
    cancelled: list[int] = []

    async def hangs_on_one(event: StepEnded) -> None:
        if event.step == 1:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.append(event.step)
                raise
        got.append(event.step)

    async with ev.EventBus(close_timeout=5) as bus:
        failures, sibling = Rec(), Rec()
        bus.subscribe(failures, events=(CallbackFailed,))
        bus.subscribe(hangs_on_one, events=(StepEnded,), timeout=0.05)
        bus.subscribe(sibling, events=(StepEnded,))
        for i in range(3):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            await sibling.reached(3)  # not held up by the hanging one
            assert (await bus.drain()).ok
        st = bus.stats()["hangs_on_one"]
    assert got == [0, 2] and cancelled == [1]
    assert st.failed == 1 and st.delivered == 2
    [failed] = failures.items
    assert failed.subscriber == "hangs_on_one" and "timeout" in failed.error
    assert any("hook=StepEnded" in m and "timeout" in m for m in failure_messages(warnings_log))


async def test_drain_and_publish_and_wait_inside_an_async_handler_skip_the_caller() -> None:
    reports: list[ev.DrainReport] = []
    seen_by_other_at_drain: list[int] = []

    async def other(event: Any) -> None:
        await checkpoint()
        other_got.append(event)

    other_got: list[Any] = []

    async def drainer(event: StepEnded) -> None:
        if event.step == 5:
            reports.append(await bus.drain(timeout=WAIT))
            seen_by_other_at_drain.append(len(steps_of(other_got)))
            reports.append(await bus.publish_and_wait(step(100), timeout=WAIT))

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(other, events=(StepEnded,))
        bus.subscribe(drainer, events=(StepEnded,))
        for i in range(10):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert [r.ok for r in reports] == [True, True]
    assert seen_by_other_at_drain == [10]
    assert 100 in steps_of(other_got)


async def test_drain_waits_for_an_async_subscribers_flush() -> None:
    # A def subscriber counts as done after on_batch_end (its thread marks the batch
    # done after the flush); an async one must too: drain/publish_and_wait are how
    # tests and the loop know a logger's file holds an event.
    gate = anyio.Event()
    flushed: list[int] = []
    got: list[int] = []

    async def handler(event: StepEnded) -> None:
        got.append(event.step)

    async def flush() -> None:
        await gate.wait()
        flushed.append(len(got))

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(handler, on_batch_end=flush, events=(StepEnded,))
        with anyio.fail_after(WAIT):
            report = await bus.publish_and_wait(step(0), timeout=0.2)
            assert got == [0]
            assert not report.ok and flushed == []
            report = await bus.drain(timeout=0.2)
            assert not report.ok
            gate.set()
            assert (await bus.drain()).ok
    assert flushed == [1]


@pytest.mark.anyio
async def test_events_that_arrive_while_an_async_handler_is_busy_are_delivered() -> None:
    """No later publish, no drain: the bus itself comes back for them."""
    gate, done = anyio.Event(), anyio.Event()
    seen: list[int] = []
    async with ev.EventBus(close_timeout=5) as bus:

        async def handler(event: StepEnded) -> None:
            if event.step == 0:
                await gate.wait()
            seen.append(event.step)
            if event.step == 2:
                done.set()

        bus.subscribe(handler, events=(StepEnded,))
        bus.publish(StepEnded(step=0, num_steps=3))
        await bus.publish_and_wait(StepEnded(step=99, num_steps=3), timeout=0.01)  # handler busy
        bus.publish(StepEnded(step=1, num_steps=3))
        bus.publish(StepEnded(step=2, num_steps=3))
        gate.set()
        with anyio.fail_after(5):
            await done.wait()
    assert seen == [0, 99, 1, 2]  # all delivered, in publish order
