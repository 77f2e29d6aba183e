"""Subscription (``subscription.py``): the handle on one subscriber that ``subscribe`` returns.

``wait(seq)`` is a barrier for this subscriber alone; ``aclose()`` drains it,
then runs ``on_close`` where the handler runs; ``call(fn)`` runs code there;
``current_subscription()`` names the subscription whose handler is running.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import evsys_async as ev
from evsys_async.bus.subscription import current_subscription
from evsys_async.events import StepEnded
from tests.bus.helpers import WAIT, Rec, SyncRec, ping, step

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_aclose_drains_then_runs_on_close_in_the_handlers_thread_or_task(kind: str) -> None:
    where: dict[str, Any] = {}
    got: list[int] = []

    def ident() -> tuple[int, Any]:
        try:
            task = anyio.get_current_task().id
        except Exception:  # no task in a plain thread
            task = None
        return threading.get_ident(), task

    if kind == "async":

        async def handler(event: Any) -> None:
            where["handler"] = ident()
            got.append(event.step)

        async def on_close() -> None:
            where["close"] = ident()
    else:

        def handler(event: Any) -> None:
            where["handler"] = ident()
            got.append(event.step)

        def on_close() -> None:
            where["close"] = ident()

    async with ev.EventBus(close_timeout=5) as bus:
        sub = bus.subscribe(handler, on_close=on_close, name="closing")
        for i in range(5):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert await sub.aclose(timeout=WAIT)
        assert got == list(range(5))
        assert where["close"] == where["handler"]
        if kind == "def":
            assert where["close"][0] != threading.get_ident()
        bus.publish(step(5))  # after aclose: not delivered
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        assert got == list(range(5))
        assert bus.stats()["closing"].delivered == 5  # ended subscriptions stay in stats
        with anyio.fail_after(WAIT):
            assert await sub.aclose()  # idempotent
            assert await sub.wait(bus.last_seq, timeout=1)  # an ended subscription counts as done


async def test_subscription_wait_is_a_barrier_for_one_subscriber() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        gate = anyio.Event()
        slow_got: list[int] = []

        async def slow(event: Any) -> None:
            await gate.wait()
            slow_got.append(event.step)

        fast = Rec()
        sub_fast = bus.subscribe(fast)
        sub_slow = bus.subscribe(slow)
        seq = None
        for i in range(5):
            seq = bus.publish(step(i))
        assert seq is not None
        with anyio.fail_after(WAIT):
            assert await sub_fast.wait(seq, timeout=WAIT)
            assert len(fast.items) == 5
            assert not await sub_slow.wait(seq, timeout=0.05)
            assert slow_got == []
            gate.set()
            assert await sub_slow.wait(seq, timeout=WAIT)
        assert slow_got == list(range(5))


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_call_runs_where_the_handler_runs_and_raises_what_fn_raised(kind: str) -> None:
    where: dict[str, int] = {}
    if kind == "async":

        async def handler(event: Any) -> None:
            where["handler"] = threading.get_ident()
    else:

        def handler(event: Any) -> None:
            where["handler"] = threading.get_ident()

    def boom() -> None:
        raise KeyError("from call")

    async with ev.EventBus(close_timeout=5) as bus:
        sub = bus.subscribe(handler)
        with anyio.fail_after(WAIT):
            assert (await bus.publish_and_wait(ping(0))).ok
            assert await sub.call(threading.get_ident) == where["handler"]
            with pytest.raises(KeyError, match="from call"):
                await sub.call(boom)
            assert await sub.call(lambda: "still there") == "still there"
    if kind == "def":
        assert where["handler"] != threading.get_ident()
    else:
        assert where["handler"] == threading.get_ident()


async def test_call_on_an_ended_def_subscriber_raises_bus_closed() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        sub = bus.subscribe(SyncRec())
        with anyio.fail_after(WAIT):
            assert await sub.aclose(timeout=WAIT)
            with pytest.raises(ev.BusClosedError, match="has ended"):
                await sub.call(lambda: None)


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_current_subscription_names_the_running_handlers_own(kind: str) -> None:
    seen: list[Any] = []
    if kind == "async":

        async def handler(event: Any) -> None:
            seen.append(current_subscription())
    else:

        def handler(event: Any) -> None:
            seen.append(current_subscription())

    async with ev.EventBus(close_timeout=5) as bus:
        sub = bus.subscribe(handler, name="mine")
        bus.subscribe(Rec(), name="other")
        with anyio.fail_after(WAIT):
            assert (await bus.publish_and_wait(ping(0))).ok
    assert seen == [sub]
    assert current_subscription() is None  # outside any handler


async def test_a_subscription_shows_what_it_was_subscribed_with() -> None:
    async def handler(event: Any) -> None:
        raise ValueError("last one")

    async with ev.EventBus(close_timeout=5) as bus:
        policy = ev.DropOldest(5)
        sub = bus.subscribe(
            handler,
            events=(StepEnded,),
            policy=policy,
            name="shown",
            timeout=3.0,
            envelopes=True,
            run_key="r1",
        )
        assert (sub.name, sub.handler, sub.events, sub.policy) == (
            "shown",
            handler,
            (StepEnded,),
            policy,
        )
        assert (sub.timeout, sub.envelopes, sub.run_key, sub.is_async) == (3.0, True, "r1", True)
        assert not sub.stuck and sub.last_error is None
        assert "shown" in repr(sub)
        with anyio.fail_after(WAIT):
            assert (await bus.publish_and_wait(step(0, "r1"))).ok
        assert isinstance(sub.last_error, ValueError) and str(sub.last_error) == "last one"
        assert sub.stats() == bus.stats()["shown"]
        assert sub.stats().failed == 1 and sub.stats().delivered == 0
