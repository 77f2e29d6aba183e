"""Delivery policies: what a lagging subscriber's buffer keeps, and what it counts.

The buffers are checked directly here (bound, order, drop counts), against a
reference model under hypothesis; the last tests check them on a live bus.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import anyio
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

import evsys_async as ev
from evsys_async.events import EvalEnded, Event, StepEnded, SubscriberLagged
from evsys_async.policies import DropOldest, Latest, Lossless
from tests.bus.helpers import WAIT, thread_wait
from tests.bus.helpers import step as bus_step


class PolTestLevel(Event):
    """A user event that opts into coalescing."""

    value: int = 0
    coalesce: ClassVar[bool] = True


def step(i: int, run_key: str = "") -> StepEnded:
    return StepEnded(step=i, num_steps=100, run_key=run_key)


def evl(i: int, run_key: str = "") -> EvalEnded:
    return EvalEnded(step=i, eval_name="val", run_key=run_key)


def test_public_names_and_defaults() -> None:
    assert ev.Lossless is Lossless and ev.Latest is Latest and ev.DropOldest is DropOldest
    assert Latest().max_kept == 1000
    assert not Lossless.bounded and Latest.bounded and DropOldest.bounded
    assert Lossless() == Lossless() and Latest(5) == Latest(max_kept=5)
    with pytest.raises(AttributeError):
        DropOldest(3).maxlen = 4  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: Latest(max_kept=0), ["max_kept", ">= 1", "0"]),
        (lambda: DropOldest(maxlen=0), ["maxlen", ">= 1", "0"]),
        (lambda: DropOldest(maxlen=-3), ["maxlen", "-3"]),
    ],
)
def test_bad_bounds_raise_value_error_naming_the_argument(make, words: list[str]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as info:
        make()
    for word in words:
        assert word in str(info.value)


def test_drop_oldest_keeps_the_newest_window_and_counts() -> None:
    buf = DropOldest(3).buffer()
    for i in range(10):
        buf.put((i, step(i)))
        assert len(buf) <= 3
    assert buf.dropped == 7
    assert [seq for seq, _ in buf.take()] == [7, 8, 9]
    assert len(buf) == 0 and buf.take() == []
    buf.put((10, evl(10)))
    assert [seq for seq, _ in buf.take()] == [10]
    assert buf.dropped == 7  # counts accumulate over takes


def test_latest_coalesces_steps_per_run_and_keeps_others_in_order() -> None:
    buf = Latest().buffer()
    entries = [
        (0, step(0, "a")),
        (1, evl(1, "a")),
        (2, step(2, "b")),
        (3, step(3, "a")),  # replaces 0; takes its own place after 2
        (4, evl(4, "a")),
        (5, step(5, "b")),  # replaces 2
    ]
    for entry in entries:
        buf.put(entry)
    assert buf.dropped == 2
    assert [seq for seq, _ in buf.take()] == [1, 3, 4, 5]


def test_latest_coalesces_lagged_and_opted_in_user_events() -> None:
    buf = Latest().buffer()
    buf.put((0, SubscriberLagged(subscriber="x", pending=10)))
    buf.put((1, PolTestLevel(value=1)))
    buf.put((2, SubscriberLagged(subscriber="x", pending=20)))
    buf.put((3, PolTestLevel(value=2)))
    assert buf.dropped == 2
    got = buf.take()
    assert [seq for seq, _ in got] == [2, 3]


def test_latest_max_kept_bounds_rare_events_and_counts() -> None:
    buf = Latest(max_kept=3).buffer()
    for i in range(6):
        buf.put((2 * i, evl(2 * i)))
        buf.put((2 * i + 1, step(2 * i + 1)))
    # 6 evals, 3 kept; 6 steps, 1 kept
    assert len(buf) == 4
    assert buf.dropped == 3 + 5
    assert [seq for seq, _ in buf.take()] == [6, 8, 10, 11]


def test_latest_max_kept_never_drops_coalescing_entries() -> None:
    buf = Latest(max_kept=1).buffer()
    buf.put((0, step(0, "a")))
    buf.put((1, step(1, "b")))
    buf.put((2, evl(2)))
    buf.put((3, evl(3)))  # drops the eval at 2, not a step
    assert [seq for seq, _ in buf.take()] == [0, 1, 3]
    assert buf.dropped == 1


# -- against a reference model ------------------------------------------------------

_kinds = st.sampled_from(["step", "eval", "level"])
_runs = st.sampled_from(["", "a", "b"])
_ops = st.lists(st.one_of(st.tuples(_kinds, _runs), st.just(("take", ""))), max_size=80)


def _make(kind: str, i: int, run_key: str) -> Event:
    if kind == "step":
        return step(i, run_key)
    if kind == "eval":
        return evl(i, run_key)
    return PolTestLevel(value=i, run_key=run_key)


@settings(max_examples=200, deadline=None)
@given(ops=_ops, max_kept=st.integers(min_value=1, max_value=6))
def test_latest_matches_model(ops: list[tuple[str, str]], max_kept: int) -> None:
    buf = Latest(max_kept=max_kept).buffer()
    model: list[tuple[int, Event]] = []
    dropped = 0
    for i, (kind, run_key) in enumerate(ops):
        if kind == "take":
            assert buf.take() == model
            model = []
            continue
        event = _make(kind, i, run_key)
        if event.coalesce:
            key = (type(event), event.run_key)
            before = len(model)
            model = [e for e in model if not (e[1].coalesce and (type(e[1]), e[1].run_key) == key)]
            dropped += before - len(model)
            model.append((i, event))
        else:
            model.append((i, event))
            rare = [e for e in model if not e[1].coalesce]
            if len(rare) > max_kept:
                model.remove(rare[0])
                dropped += 1
        buf.put((i, event))
        assert len(buf) == len(model)
        assert buf.dropped == dropped
        # bound: max_kept rare events plus one per (type, run) of level events
        assert len(buf) <= max_kept + 2 * 3
    assert buf.take() == model


@settings(max_examples=200, deadline=None)
@given(ops=_ops, maxlen=st.integers(min_value=1, max_value=6))
def test_drop_oldest_matches_model(ops: list[tuple[str, str]], maxlen: int) -> None:
    buf = DropOldest(maxlen).buffer()
    model: list[tuple[int, Event]] = []
    dropped = 0
    for i, (kind, run_key) in enumerate(ops):
        if kind == "take":
            assert buf.take() == model
            model = []
            continue
        model.append((i, _make(kind, i, run_key)))
        if len(model) > maxlen:
            model.pop(0)
            dropped += 1
        buf.put(model[-1])
        assert len(buf) == len(model) <= maxlen
        assert buf.dropped == dropped
    assert buf.take() == model


# -- on a live bus ----------------------------------------------------------------


@pytest.mark.anyio
async def test_latest_coalesces_steps_keeps_rare_events_and_counts() -> None:
    gate, entered = anyio.Event(), anyio.Event()
    got: list[Event] = []

    async def progress(event: Event) -> None:
        got.append(event)
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=10_000, close_timeout=5) as bus:
        bus.subscribe(progress, policy=ev.Latest(max_kept=2), events=(StepEnded, EvalEnded))
        first = bus_step(0)
        bus.publish(first)
        with anyio.fail_after(WAIT):
            await entered.wait()  # holding step 0
        published = [
            bus_step(1, "a"),
            EvalEnded(step=1, eval_name="e1"),
            bus_step(2, "a"),
            bus_step(1, "b"),
            EvalEnded(step=2, eval_name="e2"),
            EvalEnded(step=3, eval_name="e3"),  # max_kept=2: e1 goes
            bus_step(3, "a"),
        ]
        for e in published:
            bus.publish(e)
        st = bus.stats()["progress"]
        assert st.pending == 5 and st.dropped == 3  # 4 kept + step 0 in its hands
        assert st.coalesced == 2  # steps 1a and 2a replaced; e1 was forced out by max_kept
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st = bus.stats()["progress"]
    # steps 1a and 2a were replaced (3a took its own place), e1 fell past max_kept
    assert got == [first, published[3], published[4], published[5], published[6]]
    assert st.dropped == 3 and st.delivered == 5 and st.max_pending <= 4


@pytest.mark.parametrize("policy", [ev.DropOldest(8), ev.Latest(max_kept=8)], ids=repr)
@pytest.mark.anyio
async def test_memory_bounded_under_a_stuck_bounded_subscriber(policy: ev.Policy) -> None:
    release, entered = threading.Event(), threading.Event()

    def stuck(event: Event) -> None:
        entered.set()
        release.wait()

    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            try:
                bus.subscribe(stuck, policy=policy, events=(EvalEnded, StepEnded))
                bus.publish(bus_step(0))
                await thread_wait(entered)
                for i in range(1, 5000):
                    bus.publish(EvalEnded(step=i, eval_name="v") if i % 2 else bus_step(i))
                    if i % 100 == 0:
                        # 8 kept (+ 1 step for Latest) + 1 in its hands
                        assert bus.stats()["stuck"].pending <= 10
                        await checkpoint()
                st = bus.stats()["stuck"]
                assert st.pending <= 10 and st.max_pending <= 9
                assert (
                    st.dropped == 5000 - st.pending
                )  # every event is kept, in its hands or dropped
            finally:
                release.set()
