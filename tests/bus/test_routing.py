"""Routes (``_routing.py``): which subscribers an event reaches.

By type, subclasses included; by run key (events without one reach every
run's subscribers); only events published after ``subscribe``; and never a
subscriber's own failure.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import evsys_async as ev
from evsys_async.events import (
    CallbackFailed,
    EvalEnded,
    Event,
    StepEnded,
    TrainEnded,
)
from tests.bus.helpers import (
    WAIT,
    BusTestEvalPlus,
    BusTestPing,
    Rec,
    ping,
    step,
)

pytestmark = pytest.mark.anyio


async def test_matching_by_type_subclasses_included() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        evals, everything, steps = Rec(), Rec(), Rec()
        bus.subscribe(evals, events=(EvalEnded,))
        bus.subscribe(everything)  # default: Event, i.e. all
        bus.subscribe(steps, events=[StepEnded, TrainEnded])  # any iterable of types
        published = [
            step(0),
            EvalEnded(step=0, eval_name="v"),
            BusTestEvalPlus(step=0, eval_name="plus"),
            ping(1),
            TrainEnded(status="completed", steps_completed=1, num_steps=1),
        ]
        for e in published:
            bus.publish(e)
        with anyio.fail_after(WAIT):
            await bus.drain()
    assert everything.items == published
    assert evals.items == published[1:3]
    assert steps.items == [published[0], published[4]]


async def test_run_key_filter_keeps_own_run_and_run_less_events() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        a, b, all_runs = Rec(), Rec(), Rec()
        bus.subscribe(a, run_key="a")
        bus.subscribe(b, run_key="b")
        bus.subscribe(all_runs)
        published = [step(0, "a"), step(0, "b"), ping(7), step(1, "a")]
        for e in published:
            bus.publish(e)
        with anyio.fail_after(WAIT):
            await bus.drain()
    assert a.items == [published[0], published[2], published[3]]
    assert b.items == [published[1], published[2]]
    assert all_runs.items == published


async def test_subscriber_sees_only_events_published_after_subscribe() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        early = Rec()
        bus.subscribe(early)
        bus.publish(ping(0))
        late = Rec()
        bus.subscribe(late)
        bus.publish(ping(1))
        with anyio.fail_after(WAIT):
            await bus.drain()
    assert [e.n for e in early.items] == [0, 1]
    assert [e.n for e in late.items] == [1]


async def test_a_subscriber_is_never_told_about_its_own_failure() -> None:
    got: list[Event] = []

    async def boom(event: Event) -> None:
        got.append(event)
        if isinstance(event, BusTestPing):
            raise RuntimeError("x")

    async with ev.EventBus(close_timeout=5) as bus:
        other = Rec()
        bus.subscribe(boom)
        bus.subscribe(other, events=(CallbackFailed,))
        bus.publish(ping(0))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert got == [got[0]] and isinstance(got[0], BusTestPing)
    assert [f.subscriber for f in other.items] == ["boom"]
